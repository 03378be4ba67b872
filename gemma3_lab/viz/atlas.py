"""Mask pictures in matplotlib: one panel per distinct mask (`mask_figure`, the figure of the
mask visualizer) and the atlas of every layer (`mask_atlas`), with the window edge drawn and
image blocks outlined. Images hold the cell classes of `maskset`; `>= ALLOWED` is the mask."""

from __future__ import annotations

import math

from gemma3_lab.viz.common import label_figure, resolve_source, set_token_ticks
from gemma3_lab.viz.maskset import ALLOWED, CLASS_NAMES, CUT, DIAG, IMAGE, MASKED, MaskSet, build_mask_set, cell_classes

COLORS = {MASKED: "#f1f1f1", CUT: "#f4c7c3", ALLOWED: "#4a5a70", IMAGE: "#e8a200", DIAG: "#2e9e4f"}
EDGE_COLOR = "#00a0b0"


def class_cmap():
    from matplotlib.colors import BoundaryNorm, ListedColormap

    cmap = ListedColormap([COLORS[c] for c in sorted(COLORS)])
    return cmap, BoundaryNorm([c - 0.5 for c in range(len(COLORS) + 1)], cmap.N)


def draw_mask(ax, classes, labels: list[str], window: int | None = None, spans=(), title: str = "",
              ticks: str = "both", fontsize: float = 10):
    """Draw one (S, T) class grid on `ax`: cells, grid lines for short prompts, the window
    edge as a staircase before the first key inside the window, image blocks outlined."""
    import numpy as np
    from matplotlib.patches import Rectangle

    cmap, norm = class_cmap()
    arr = classes.numpy() if hasattr(classes, "numpy") else np.asarray(classes)
    im = ax.imshow(arr, cmap=cmap, norm=norm, interpolation="nearest", aspect="equal")
    S, T = arr.shape
    if T <= 48:  # cell borders help counting; on long prompts they would hide the cells
        ax.set_xticks(np.arange(-0.5, T, 1), minor=True)
        ax.set_yticks(np.arange(-0.5, S, 1), minor=True)
        ax.grid(which="minor", color="white", linewidth=0.6)
        ax.tick_params(which="minor", length=0)
    if window is not None:
        q = np.arange(S)
        edge = q - window + 1
        keep = edge > 0
        ax.vlines(edge[keep] - 0.5, q[keep] - 0.5, q[keep] + 0.5, color=EDGE_COLOR, linewidth=2.5, zorder=3)
    for s in spans:
        ax.add_patch(Rectangle((s.start - 0.5, s.start - 0.5), s.end - s.start, s.end - s.start, fill=False,
                               edgecolor="#a06000", linewidth=1.2, linestyle="--"))
    if ticks == "none":
        ax.set_xticks([])
        ax.set_yticks([])
    else:
        set_token_ticks(ax, labels, ticks, spans)
    ax.set_xlabel("key (attended to)", fontsize=fontsize - 1)
    ax.set_ylabel("query (attending)", fontsize=fontsize - 1)
    if title:
        ax.set_title(title, fontsize=fontsize)
    return im


def class_legend(fig, grids, window_cuts: bool, **where) -> None:
    """The figure's legend of the cell classes present in `grids` (and the window edge, if a
    window cuts any of them): every mask picture carries one."""
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    present = set()
    for g in grids:
        present |= set(g.unique().tolist())
    handles = [Patch(facecolor=COLORS[c], edgecolor="#999", label=CLASS_NAMES[c]) for c in sorted(present)]
    if window_cuts:
        handles.append(Line2D([], [], color=EDGE_COLOR, linewidth=2, label="window edge"))
    fig.legend(handles=handles, ncol=min(len(handles), 6), fontsize=8, frameon=False, **where)


def _legend(fig, ms: MaskSet, y: float = 0.995) -> None:
    class_legend(fig, [p.classes for p in ms.panels], any(p.window_cuts for p in ms.panels), loc="upper center",
                 bbox_to_anchor=(0.5, y))


def mask_figure(ms: MaskSet):
    """The mask visualizer's picture: one panel per distinct mask, titled with its layers."""
    import matplotlib.pyplot as plt

    n = len(ms.panels)
    side = min(4 + 0.18 * ms.n_tokens, 9)
    fig, axes = plt.subplots(1, n, figsize=(side * n + 1, side + 1.6), squeeze=False, layout="constrained")
    for ax, p in zip(axes[0], ms.panels):
        draw_mask(ax, p.classes, ms.labels, p.window, ms.spans(), p.title)
    head = f"Attention masks · {ms.source.name} · {ms.n_tokens} tokens"
    if ms.window_override is not None:
        head += f" · window {ms.window_override} (the model's is {ms.config.text.sliding_window})"
    fig.suptitle(head, fontsize=12, y=1.0)
    _legend(fig, ms, y=0.965)
    fig.get_layout_engine().set(rect=(0, 0.03, 1, 0.9))
    label_figure(fig, ms.config, images=bool(ms.spans()))
    return fig


def mask_atlas(model_or_source, prompt=None, images=None, window: int | None = None, pan_and_scan: bool = False,
               cols: int = 6):
    """Every layer's mask in one figure, labelled "L3 local" / "L5 global" (a `MaskSet` may
    be passed instead of a model and prompt)."""
    import matplotlib.pyplot as plt

    ms = model_or_source if isinstance(model_or_source, MaskSet) else build_mask_set(
        resolve_source(model_or_source), prompt, images, window, pan_and_scan)
    L = len(ms.masks)
    cols = min(cols, L)
    rows = math.ceil(L / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(2.3 * cols + 1.2, 2.4 * rows + 1.3), squeeze=False,
                             layout="constrained")
    short = ms.n_tokens <= 20
    for i, ax in enumerate(axes.flat):
        if i >= L:
            ax.axis("off")
            continue
        kind = ms.config.text.layer_types[i]
        ticks = "y" if short and i % cols == 0 else "none"
        draw_mask(ax, cell_classes(ms.masks[i], ms.block_ids), ms.labels, ms.windows[i], ms.spans(),
                  ticks=ticks, fontsize=8)
        ax.set_xlabel("")
        ax.set_ylabel("")
        if ticks == "y":
            ax.tick_params(axis="y", labelsize=6)
        w = f" (w {ms.windows[i]})" if ms.windows[i] is not None else ""
        ax.set_title(f"L{i} {kind.short}{w}", fontsize=9, color="#1f4e9c" if kind.short == "global" else "#333",
                     fontweight="bold" if kind.short == "global" else "normal")
    fig.suptitle(f"Mask atlas · {ms.source.name} · {ms.n_tokens} tokens · every layer (query ↓, key →)", fontsize=12)
    _legend(fig, ms, y=0.955)
    fig.get_layout_engine().set(rect=(0, 0.03, 1, 0.9))
    label_figure(fig, ms.config, images=bool(ms.spans()))
    return fig


def allowed(arr):
    """The boolean mask a drawn class grid stands for."""
    return arr >= ALLOWED
