"""The masks one prompt gets in every layer, computed with the model's own mask functions
(`masks.model_masks`) and grouped into one panel per distinct mask, ready to draw."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from gemma3_lab.config import AttentionType
from gemma3_lab.model.masks import image_block_ids, model_masks
from gemma3_lab.prompt.inputs import Inputs
from gemma3_lab.prompt.processor import START_OF_IMAGE, Processor
from gemma3_lab.viz.common import Source, token_labels

# cell classes, in drawing order: what a cell of a mask picture means
MASKED, CUT, ALLOWED, IMAGE, DIAG = range(5)
CLASS_NAMES = {
    MASKED: "masked (a later token)",
    CUT: "masked by the window (or padding)",
    ALLOWED: "may attend",
    IMAGE: "may attend, same image (both ways)",
    DIAG: "itself (diagonal)",
}


def layer_ranges(layers) -> str:
    """(0, 1, 2, 3, 4, 6, 7) -> "L0–4, L6–7"."""
    runs: list[list[int]] = []
    for i in layers:
        if runs and i == runs[-1][-1] + 1:
            runs[-1].append(i)
        else:
            runs.append([i])
    return ", ".join(f"L{r[0]}" if len(r) == 1 else f"L{r[0]}–{r[-1]}" for r in runs)


@dataclass
class Panel:
    """The one mask a group of layers shares."""

    kind: AttentionType
    window: int | None
    layers: tuple[int, ...]
    mask: Tensor  # (S, T) bool, True = may attend
    classes: Tensor = field(repr=False, default=None)  # (S, T) long, one of the cell classes

    @property
    def title(self) -> str:
        head = f"{self.kind.short} ×{len(self.layers)}: {layer_ranges(self.layers)}"
        if self.window is None:
            return head + " · every earlier token"
        return head + f" · sliding window {self.window} (itself + {self.window - 1} before)"

    @property
    def window_cuts(self) -> bool:
        return bool((self.classes == CUT).any())


@dataclass
class MaskSet:
    """Every layer's mask for one prompt (row `batch` of `inputs`), and the panels to draw."""

    source: Source
    inputs: Inputs
    labels: list[str]
    windows: list[int | None]  # per layer, as drawn (an override replaces the local window)
    masks: list[Tensor]  # per layer (S, T) bool, exactly what the layer uses
    panels: list[Panel]
    block_ids: Tensor  # (T,) image block of every slot, -1 for text
    batch: int = 0
    window_override: int | None = None
    placeholder_images: bool = False

    @property
    def config(self):
        return self.source.config

    @property
    def n_tokens(self) -> int:
        return len(self.labels)

    def spans(self):
        return [s for s in self.inputs.image_spans if s.batch == self.batch]


def cell_classes(mask: Tensor, block_ids: Tensor) -> Tensor:
    """(S, T) cell classes of a full-forward mask: queries and keys are both slots 0..T-1."""
    S, T = mask.shape
    q = torch.arange(S)[:, None]
    k = torch.arange(T)[None, :]
    cls = torch.full((S, T), MASKED, dtype=torch.long)
    cls[~mask & (k <= q)] = CUT  # causality allows it, so the window (or padding) removed it
    cls[mask] = ALLOWED
    bq, bk = block_ids[:S][:, None], block_ids[None, :T]
    cls[mask & (bq == bk) & (bq >= 0)] = IMAGE
    cls[mask & (q == k)] = DIAG
    return cls


def prompt_inputs(source: Source, prompt, images=None, pan_and_scan: bool = False) -> tuple[Inputs, bool]:
    """Inputs for a prompt, and whether placeholder pictures stood in for missing images.

    "<img>" is accepted for `<start_of_image>` as in transformers' visualizer. A multimodal
    config with markers but no images gets flat grey placeholders: masks depend only on
    where the soft tokens sit, never on pixels.
    """
    if isinstance(prompt, Inputs):
        return prompt, False
    if isinstance(prompt, str):
        prompt = prompt.replace("<img>", START_OF_IMAGE)
    elif isinstance(prompt, (list, tuple)) and prompt and all(isinstance(p, str) for p in prompt):
        raise ValueError("the mask visualizer draws one prompt at a time; pass a string, not a list")
    placeholder = False
    cfg = source.config
    if images is None and cfg.is_multimodal and isinstance(prompt, str) and START_OF_IMAGE in prompt:
        from PIL import Image

        size = cfg.vision.image_size
        images = [Image.new("RGB", (size, size), (128, 128, 128))] * prompt.count(START_OF_IMAGE)
        placeholder = True
    return Processor(source.tokenizer, cfg)(prompt, images, pan_and_scan=pan_and_scan), placeholder


def layer_windows(config, window: int | None = None) -> list[int | None]:
    """Each layer's sliding window (None for global), with `window` replacing the local one."""
    t = config.text
    return [(window or t.sliding_window) if k is AttentionType.LOCAL_SLIDING else None for k in t.layer_types]


def build_mask_set(source: Source, prompt, images=None, window: int | None = None,
                   pan_and_scan: bool = False, batch: int = 0) -> MaskSet:
    """Compute every layer's mask for `prompt` as the model would in one uncached forward."""
    if window is not None and window < 1:
        raise ValueError(f"window must be a positive number of tokens, not {window}")
    inputs, placeholder = prompt_inputs(source, prompt, images, pan_and_scan)
    B, T = inputs.input_ids.shape
    if not 0 <= batch < B:
        raise ValueError(f"batch {batch} is out of range for {B} prompt(s)")
    windows = layer_windows(source.config, window)
    # the model passes no key mask when nothing is padding (explorer -> network._key_valid)
    am = inputs.attention_mask
    key_valid = None if bool(am.bool().all()) else am
    per_layer = [m[min(batch, m.shape[0] - 1), 0] for m in model_masks(windows, T, inputs.token_types, key_valid)]
    blocks = image_block_ids(inputs.token_types)[batch]
    panels: dict[tuple, Panel] = {}
    for i, (kind, w) in enumerate(zip(source.config.text.layer_types, windows)):
        key = (kind, w)
        if key not in panels:
            panels[key] = Panel(kind, w, (), per_layer[i], cell_classes(per_layer[i], blocks))
        panels[key].layers += (i,)
    labels = token_labels(source.tokenizer, inputs.input_ids, source.config, inputs.image_spans, batch)
    # local panels first, as the layers run (5 local, then 1 global)
    ordered = sorted(panels.values(), key=lambda p: (p.kind is AttentionType.GLOBAL, p.layers[0]))
    return MaskSet(source, inputs, labels, windows, per_layer, ordered, blocks, batch, window, placeholder)
