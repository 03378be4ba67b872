"""The visualizers' matplotlib figures turned into images for the page (and closed at once,
so a long-running server does not pile up figures). Drawing itself is `gemma3_lab.viz`'s."""

from __future__ import annotations

import io
import tempfile
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # the server draws in worker threads, never on a screen

import matplotlib.pyplot as plt  # noqa: E402
from PIL import Image  # noqa: E402

from gemma3_lab.model.masks import image_block_ids
from gemma3_lab.viz.atlas import class_legend, draw_mask
from gemma3_lab.viz.attention import attention_heatmap, head_grid
from gemma3_lab.viz.downloads import figure_downloads
from gemma3_lab.viz.lens import logit_lens_grid
from gemma3_lab.viz.maskset import cell_classes

DPI = 110


def to_image(fig) -> Image.Image:
    buf = io.BytesIO()
    try:
        fig.savefig(buf, format="png", dpi=DPI, bbox_inches="tight")
    finally:
        plt.close(fig)
    buf.seek(0)
    return Image.open(buf).convert("RGB")


def to_files(fig, folder: Path, stem: str) -> tuple[Image.Image, list[str]]:
    """(the picture shown, [PNG path, SVG path]): the PNG holds exactly the pixels shown, the SVG
    the same figure with its labels as text; the figure is closed."""
    try:
        png, svg = figure_downloads(fig, dpi=DPI)
    finally:
        plt.close(fig)
    paths = [folder / f"{stem}.png", folder / f"{stem}.svg"]
    paths[0].write_bytes(png)
    paths[1].write_bytes(svg)
    return Image.open(io.BytesIO(png)).convert("RGB"), [str(p) for p in paths]


def download_folder(session) -> Path:
    """This session's folder of downloads, emptied: each look's files replace the last look's."""
    folder = session.downloads
    if folder is None or not folder.is_dir():
        folder = session.downloads = Path(tempfile.mkdtemp(prefix="gemma3_lab-downloads-"))
    for f in folder.iterdir():
        f.unlink()
    return folder


def mark_query(fig, query: int) -> None:
    """A line through the row of the query that produced the inspected token, on every panel."""
    for ax in fig.axes:
        if ax.get_label() != "<colorbar>":
            ax.axhline(query, color="#1f4fd1", linewidth=1.2, alpha=0.85)


def heatmap_figure(ins):
    """The layer's attention from the visualizers: one head, or every head of the layer."""
    spans = ins.inputs.image_spans
    if ins.head < 0:
        fig = head_grid(ins.cache, ins.layer, tokens=ins.labels, spans=spans)
    else:
        fig = attention_heatmap(ins.cache, ins.layer, ins.head, tokens=ins.labels, spans=spans)
    mark_query(fig, ins.query)
    return fig


def lens_figure(lens, config):
    """The logit-lens grid of `gemma3_lab.viz.lens` (its last column: the inspected position)."""
    return logit_lens_grid(lens, config=config)


def layer_mask_figure(ins):
    """The inspected layer's real mask (its `hook_mask`) drawn with the mask visualizer's
    cells; the row of the query that produced the inspected token is marked."""
    n = len(ins.labels)
    side = min(3.5 + 0.16 * n, 7.5)
    fig, ax = plt.subplots(figsize=(side + 0.8, side + 0.6), layout="constrained")
    classes = cell_classes(ins.mask, image_block_ids(ins.inputs.token_types)[0])
    draw_mask(ax, classes, ins.labels, ins.window, ins.inputs.image_spans,
              f"mask of layer {ins.layer} ({ins.layer_kind})", fontsize=9)
    mark_query(fig, ins.query)
    ax.annotate("query", (n - 0.5, ins.query), xytext=(4, 0), textcoords="offset points", va="center",
                color="#1f4fd1", fontsize=8, annotation_clip=False)
    class_legend(fig, [classes], ins.window is not None and n > ins.window, loc="outside lower center")
    return fig
