"""`gl.AttentionMaskVisualizer`: the attention mask each layer really uses, drawn in the
terminal, in matplotlib and as HTML in a notebook — from a config and tokenizer, no weights.

Unlike transformers' visualizer (docs/gemma3.md §8) the cells come from the same mask functions the
model runs, BOS is included, there is one panel per distinct mask titled with its layers,
the 256 soft tokens of each image (not `<start_of_image>`) are marked, and the image block
is bidirectional as in the model.
"""

from __future__ import annotations

import shutil
import sys

from gemma3_lab.viz.atlas import mask_atlas, mask_figure
from gemma3_lab.viz.common import resolve_source, use_color
from gemma3_lab.viz.maskset import MaskSet, build_mask_set
from gemma3_lab.viz.terminal import render_lines, to_html, to_text

HTML_WIDTH = 180  # characters of a notebook cell's grid before columns are elided


class MaskView:
    """The masks of one prompt: `print()` it, `.figure()` it, or let a notebook show its HTML."""

    def __init__(self, masks: MaskSet) -> None:
        self.masks = masks

    @property
    def panels(self):
        return self.masks.panels

    def text(self, width: int | None = None, color: bool = False) -> str:
        """The terminal picture, `width` characters wide (default: the terminal's)."""
        width = width or shutil.get_terminal_size((100, 40)).columns
        return to_text(render_lines(self.masks, width, color), color)

    def figure(self):
        """The same picture as a matplotlib Figure."""
        return mask_figure(self.masks)

    def atlas(self):
        """Every layer's mask in one figure."""
        return mask_atlas(self.masks)

    def _repr_html_(self) -> str:
        return to_html(render_lines(self.masks, HTML_WIDTH, True))

    def __str__(self) -> str:
        return self.text()

    def __repr__(self) -> str:
        titles = "; ".join(p.title.split(" · ")[0] for p in self.panels)
        return f"<MaskView {self.masks.source.name} · {self.masks.n_tokens} tokens · {titles}>"


class AttentionMaskVisualizer:
    """`AttentionMaskVisualizer(model_or_name_or_config, window=None)(prompt, images=None)`.

    The source is a loaded model, a `Gemma3Config`, a preset name ("gemma-3-270m",
    "gemma-3-4b", "demo-multimodal"), an HF folder or a .gguf file; no weights are read.
    `window` replaces the sliding window, so a short teaching prompt shows the band.
    Calling prints the picture (colour on a terminal unless NO_COLOR is set) and returns a
    `MaskView`; in a notebook it prints nothing and the view renders as HTML.
    """

    def __init__(self, model_or_name_or_config=None, window: int | None = None, tokenizer=None,
                 color: bool | None = None, width: int | None = None, stream=None) -> None:
        self.source = resolve_source(model_or_name_or_config, tokenizer)
        self.window = window
        self.color = color
        self.width = width
        self.stream = stream
        self.last: MaskView | None = None

    def view(self, prompt, images=None, pan_and_scan: bool = False, window: int | None = None,
             batch: int = 0) -> MaskView:
        """The masks of `prompt` (text, chat messages, or `Inputs`) without printing them."""
        w = window if window is not None else self.window
        self.last = MaskView(build_mask_set(self.source, prompt, images, w, pan_and_scan, batch))
        return self.last

    def __call__(self, prompt, images=None, pan_and_scan: bool = False, window: int | None = None,
                 batch: int = 0) -> MaskView:
        v = self.view(prompt, images, pan_and_scan, window, batch)
        if not _in_notebook():
            stream = self.stream or sys.stdout
            print(v.text(self.width, use_color(self.color, stream)), file=stream)
        return v

    def figure(self, prompt, images=None, pan_and_scan: bool = False, window: int | None = None):
        """The picture as a matplotlib Figure."""
        return self.view(prompt, images, pan_and_scan, window).figure()

    def atlas(self, prompt, images=None, pan_and_scan: bool = False, window: int | None = None):
        return self.view(prompt, images, pan_and_scan, window).atlas()

    def _repr_html_(self) -> str:
        if self.last is None:
            return f"<pre>AttentionMaskVisualizer({self.source.name}): call it with a prompt</pre>"
        return self.last._repr_html_()

    def __repr__(self) -> str:
        return f"AttentionMaskVisualizer({self.source.name!r}, window={self.window})"


def _in_notebook() -> bool:
    """True inside a Jupyter kernel, where the returned view displays itself."""
    ip = sys.modules.get("IPython")
    shell = ip.get_ipython() if ip is not None and hasattr(ip, "get_ipython") else None
    return shell is not None and type(shell).__name__ == "ZMQInteractiveShell"
