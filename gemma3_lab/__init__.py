"""gemma3_lab: see how Gemma 3 works — a from-scratch, hook-instrumented Gemma 3 with
faithful numerics, mask and attention visualizers, and a side-by-side generation app.

Axis letters used in shape comments throughout:
    B batch · S query positions · T key positions · L all cache slots · V vocabulary
    D model width · N query heads · K key/value heads · H head dim · I MLP width
    P vision patches · C vision width
"""

from .config import PRESETS, AttentionType, Gemma3Config, RopeConfig, TextConfig, VisionConfig
from .explorer import Gemma3
from .generate import GenerationResult, Step
from .hooks import ActivationCache, act_name
from .inputs import ImageSpan, Inputs
from .load import load
from .masks import layer_mask, model_masks

__all__ = [
    "PRESETS", "AttentionType", "Gemma3Config", "RopeConfig", "TextConfig", "VisionConfig",
    "Gemma3", "GenerationResult", "Step", "ActivationCache", "act_name", "ImageSpan", "Inputs",
    "load", "layer_mask", "model_masks", "AttentionMaskVisualizer",
]


def __getattr__(name: str):
    # the visualizers pull in matplotlib; import them only when asked for
    if name == "AttentionMaskVisualizer":
        from .viz.mask_visualizer import AttentionMaskVisualizer

        return AttentionMaskVisualizer
    raise AttributeError(f"module 'gemma3_lab' has no attribute {name!r}")
