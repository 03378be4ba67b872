"""gemma3_lab: see how Gemma 3 works — a from-scratch, hook-instrumented Gemma 3 with
faithful numerics, mask and attention visualizers, and a side-by-side generation app.

Axis letters used in shape comments throughout:
    B batch · S query positions · T key positions · L all cache slots · V vocabulary
    D model width · N query heads · K key/value heads · H head dim · I MLP width
    P vision patches · C vision width
"""

from gemma3_lab.config import PRESETS, AttentionType, Gemma3Config, RopeConfig, TextConfig, VisionConfig
from gemma3_lab.errors import Gemma3LabError
from gemma3_lab.explorer import Gemma3
from gemma3_lab.generate import GenerationResult, Step
from gemma3_lab.generate_batch import RowSettings, generate_batch
from gemma3_lab.instrument.hooks import ActivationCache, act_name
from gemma3_lab.load import load
from gemma3_lab.model.masks import layer_mask, model_masks
from gemma3_lab.prompt.inputs import ImageSpan, Inputs

__all__ = [
    "PRESETS", "AttentionType", "Gemma3Config", "RopeConfig", "TextConfig", "VisionConfig",
    "Gemma3", "GenerationResult", "Step", "RowSettings", "generate_batch", "ActivationCache", "act_name", "ImageSpan", "Inputs",
    "load", "layer_mask", "model_masks", "AttentionMaskVisualizer", "Gemma3LabError",
]


def __getattr__(name: str):
    if name == "AttentionMaskVisualizer":
        # deferred: the visualizers pull in matplotlib; import them only when asked for
        from gemma3_lab.viz.mask_visualizer import AttentionMaskVisualizer

        return AttentionMaskVisualizer
    raise AttributeError(f"module 'gemma3_lab' has no attribute {name!r}")
