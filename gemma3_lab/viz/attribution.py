"""Figures for "who wrote this token?": direct logit attribution per layer (attention / MLP)
and per head as bars, and the prompt coloured by per-token input attribution. They draw a
`WhoWrote` (gemma3_lab.analysis.who_wrote) — read through its fields, never recomputed."""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.colors import TwoSlopeNorm

from gemma3_lab.viz.common import printable

ATTN_COLOR, MLP_COLOR, EMBED_COLOR = "#3d7dd8", "#e8a200", "#8a8a8a"


def who_wrote_figure(w, top_heads: int = 12):
    """Left: DLA of the embedding and of every layer's attention and MLP output, side by side;
    right: the `top_heads` heads with the largest |DLA|. Bars are in logit units."""
    L = len(w.attn)
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(12, 4.2), width_ratios=[3, 1.3], layout="constrained")
    xs = np.arange(L)
    ax.bar([-1], [w.embed], 0.8, color=EMBED_COLOR, label="embedding")
    ax.bar(xs - 0.2, w.attn.numpy(), 0.4, color=ATTN_COLOR, label="attention")
    ax.bar(xs + 0.2, w.mlp.numpy(), 0.4, color=MLP_COLOR, label="MLP")
    ax.axhline(0, color="black", lw=0.6)
    ax.set_xticks([-1, *xs], ["emb", *map(str, xs)], fontsize=8)
    ax.set_xlabel("layer")
    ax.set_ylabel(f"direct logit attribution to {printable(w.token_str)!r}")
    ax.legend(fontsize=8, frameon=False)
    ax.set_title(f"Who wrote {printable(w.token_str)!r} at position {w.position}: logit {w.logit:.2f} = "
                 f"sum of the bars (off by {w.dla_error:.1e})", fontsize=10)
    flat = w.heads.flatten()
    N = w.heads.shape[1]
    order = flat.abs().argsort(descending=True)[:top_heads].tolist()[::-1]
    vals = flat[order].numpy()
    bx.barh(range(len(order)), vals, color=[ATTN_COLOR if v >= 0 else "#d1495b" for v in vals])
    bx.set_yticks(range(len(order)), [f"L{i // N}H{i % N}" for i in order], fontsize=8)
    bx.axvline(0, color="black", lw=0.6)
    bx.set_title(f"top {len(order)} heads by |DLA|", fontsize=10)
    return fig


def input_attribution_figure(tokens: list[str], values, title: str = "", width: int = 90):
    """The prompt as text, each token's background coloured by its attribution (red positive,
    blue negative, white zero), wrapped at about `width` characters."""
    values = np.asarray(values, dtype=np.float64)
    lim = float(np.abs(values).max()) or 1.0
    cmap, norm = plt.get_cmap("RdBu_r"), TwoSlopeNorm(0.0, -lim, lim)
    lines, line, used = [], [], 0
    for t, v in zip(tokens, values):
        piece = printable(t).replace(" ", "\u00a0")  # no-break spaces: measured, so boxes do not overlap
        if used + len(piece) > width and line:
            lines.append(line)
            line, used = [], 0
        line.append((piece, v))
        used += len(piece)
    lines.append(line)
    fig = plt.figure(figsize=(0.11 * width + 1.2, 0.34 * len(lines) + 0.9))
    fig.suptitle(title, fontsize=10)
    renderer = fig.canvas.get_renderer()
    pad = 2 * 0.12 * 10 * fig.dpi / 72 / fig.bbox.width  # the boxes' padding, both sides, as a figure fraction
    for row, items in enumerate(lines):
        x, y = 0.01, 1 - (row + 1) / (len(lines) + 1.2)
        for piece, v in items:
            bg = cmap(norm(v))
            dark = 0.299 * bg[0] + 0.587 * bg[1] + 0.114 * bg[2] < 0.5
            t = fig.text(x, y, piece, family="monospace", fontsize=10, color="white" if dark else "black",
                         bbox=dict(boxstyle="square,pad=0.12", fc=bg, ec="white", lw=0.5))
            x += t.get_window_extent(renderer).width / fig.bbox.width + pad
    sm = plt.cm.ScalarMappable(norm=norm, cmap=cmap)
    fig.colorbar(sm, cax=fig.add_axes([0.965, 0.12, 0.012, 0.6]))
    return fig
