"""Reading the residual stream: the logit-lens grid (layers × positions, top-1 token coloured by
its probability), the residual norm per layer, and a text coloured by each token's surprisal."""

from __future__ import annotations

import html
import math

import torch
from torch import Tensor

from gemma3_lab.viz.common import fig_label, label_figure, printable

LENS_CMAP = "viridis"
SURPRISAL_CMAP = "YlOrRd"


# ------------------------------------------------------------------------- logit lens
def lens_columns(lens, max_positions: int = 24) -> list[int]:
    """Columns of the lens to draw: all, or the last `max_positions` (where the prediction is)."""
    S = lens.top_probs.shape[1]
    return list(range(max(0, S - max_positions), S))


def logit_lens_grid(lens, columns: list[int] | None = None, max_positions: int = 24, config=None):
    """Layers (rows, embedding on top) × positions (columns): each cell names the top-1 next
    token read from that layer's residual, coloured by its probability."""
    import matplotlib.pyplot as plt

    cols = lens_columns(lens, max_positions) if columns is None else list(columns)
    probs = lens.top_probs[:, cols, 0].float()  # (L+1, C)
    R, C = probs.shape
    fig, ax = plt.subplots(figsize=(2.2 + 0.85 * C, 1.6 + 0.34 * R), layout="constrained")
    im = ax.imshow(probs.numpy(), cmap=LENS_CMAP, vmin=0.0, vmax=1.0, aspect="auto", interpolation="nearest")
    for r in range(R):
        for c, col in enumerate(cols):
            p = float(probs[r, c])
            cell = fig_label(printable(lens.top_tokens[r][col][0]), 9)
            ax.text(c, r, cell, ha="center", va="center", fontsize=6.5, color="black" if p > 0.55 else "white")
    shown = [lens.tokens[c] for c in cols]
    pos = lens.positions if getattr(lens, "positions", None) else list(range(lens.top_probs.shape[1]))
    ax.set_xticks(range(C), [f"{fig_label(printable(t), 12)} ({pos[c]})" for t, c in zip(shown, cols)], rotation=60,
                  ha="right", fontsize=7)
    ax.set_yticks(range(R), lens.layer_labels, fontsize=7)
    ax.set_xlabel("input token (slot): the cells predict the token after it")
    ax.set_ylabel("residual read after")
    ax.set_title("Logit lens · top-1 next token per layer, coloured by its probability", fontsize=10)
    fig.colorbar(im, ax=ax, shrink=0.8, label="top-1 probability")
    label_figure(fig, config)
    return fig


# ------------------------------------------------------------------------- residual norms
def residual_names(n_layers: int) -> list[str]:
    return ["blocks.0.hook_resid_pre"] + [f"blocks.{i}.hook_resid_post" for i in range(n_layers)]


def residual_norms_data(cache, batch: int = 0, n_layers: int | None = None) -> Tensor:
    """(L+1, S) L2 norm of the residual entering block 0, then after every block."""
    if n_layers is None:
        n_layers = cache.model.config.text.num_layers
    names = residual_names(n_layers)
    missing = [n for n in names if n not in cache]
    if missing:
        raise KeyError(f"residual norms need {missing[0]} (and the other resid_post points) in the cache: "
                       "capture names_filter=['blocks.0.hook_resid_pre', 'blocks.*.hook_resid_post']")
    return torch.stack([cache[n][batch].float().norm(dim=-1).cpu() for n in names])


def residual_norms(cache, tokens: list[str] | None = None, batch: int = 0, config=None):
    """Residual norm per layer: one thin line per position, the median in bold, `<bos>` apart
    (its norm is orders of magnitude larger, hence the log scale)."""
    import matplotlib.pyplot as plt

    config = config or getattr(getattr(cache, "model", None), "config", None)
    norms = residual_norms_data(cache, batch, config.text.num_layers if config else None)  # (L+1, S)
    R, S = norms.shape
    x = list(range(R))
    fig, ax = plt.subplots(figsize=(9, 4.8), layout="constrained")
    for s in range(1, S):
        ax.plot(x, norms[:, s].numpy(), color="#8aa1b9", lw=0.6, alpha=0.5)
    if S > 1:
        ax.plot(x, norms[:, 1:].median(dim=1).values.numpy(), color="#1f4e9c", lw=2.2,
                label=f"median over the other {S - 1} positions")
    first = tokens[0] if tokens else "slot 0"
    ax.plot(x, norms[:, 0].numpy(), color="#d1495b", lw=2, label=f"{first} (slot 0)")
    ax.set_yscale("log")
    labels = ["embed"] + [f"L{i}" for i in range(R - 1)]
    ax.set_xticks(x, labels, fontsize=8)
    if config is not None:
        for i in config.text.global_layers:
            ax.axvspan(i + 0.5, i + 1.5, color="#f2e6c9", zorder=0)
    ax.set_xlabel("residual read after (shaded: global layers)")
    ax.set_ylabel("‖residual‖₂ (log scale)")
    ax.set_title(f"Residual norm per layer · {S} positions", fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, which="both", axis="y")
    label_figure(fig, config)
    return fig


# ------------------------------------------------------------------------- surprisal
def surprisal_bits(logits: Tensor, ids: Tensor) -> Tensor:
    """(S,) −log₂ p(token t | tokens before t) under the model; slot 0 has no prediction (NaN)."""
    logits = logits[0] if logits.dim() == 3 else logits  # (S, V)
    ids = ids[0] if ids.dim() == 2 else ids
    logp = torch.log_softmax(logits[:-1].float(), dim=-1)
    bits = -logp.gather(-1, ids[1:, None].to(logp.device))[:, 0] / math.log(2)
    return torch.cat([torch.tensor([float("nan")]), bits.cpu()])


def _display(piece: str) -> str:
    return piece.replace("▁", " ").replace("\\n", "↵")


def surprisal_text(tokens: list[str], bits: Tensor, width_in: float = 11.0, config=None, vmax: float | None = None):
    """The text token by token on a background coloured by surprisal (bits); slot 0 unscored.
    Tokens are measured with the renderer and wrapped to `width_in` inches."""
    import matplotlib
    import matplotlib.pyplot as plt
    from matplotlib.colors import Normalize
    from matplotlib.font_manager import FontProperties

    finite = bits[torch.isfinite(bits)]
    norm = Normalize(0.0, vmax or (float(finite.max()) if len(finite) else 1.0))
    cmap = matplotlib.colormaps[SURPRISAL_CMAP]
    font = FontProperties(family="monospace", size=10)
    fig = plt.figure(figsize=(width_in, 2))
    renderer = fig.canvas.get_renderer()
    margin, line_h, pad = 0.3, 0.3, 0.04  # inches
    placed, x, line = [], margin, 0
    for tok in tokens:
        text = fig_label(_display(tok), 40)
        w_px = renderer.get_text_width_height_descent(text, font, ismath=False)[0]
        w = w_px / fig.dpi + 2 * pad
        if x + w > width_in - margin and x > margin:
            x, line = margin, line + 1
        placed.append((x, line, text))
        x += w
        if tok.endswith("\\n"):
            x, line = margin, line + 1
    lines = line + 1
    top, bottom = 0.55, 0.95  # title above, colour bar below
    height = top + lines * line_h + bottom
    fig.set_size_inches(width_in, height)
    for (x, ln, text), b in zip(placed, bits.tolist()):
        fc = "#e6e6e6" if math.isnan(b) else cmap(norm(b))
        dark = not math.isnan(b) and 0.3 * fc[0] + 0.6 * fc[1] + 0.1 * fc[2] < 0.45
        t = fig.text(x + pad, height - top - (ln + 0.5) * line_h, text, fontproperties=font, ha="left",
                     va="center", transform=fig.dpi_scale_trans, color="white" if dark else "black",
                     bbox=dict(boxstyle=f"square,pad={pad * 72 / 10:.2f}", fc=fc, ec="none"))
        t.set_gid("token")
    mean = float(finite.mean()) if len(finite) else float("nan")
    fig.text(margin, height - 0.25, f"Surprisal per token · mean {mean:.2f} bits over {len(finite)} predicted tokens",
             ha="left", va="center", fontsize=10, transform=fig.dpi_scale_trans)
    cax = fig.add_axes((margin / width_in, 0.55 / height, 0.4, 0.12 / height))
    fig.colorbar(matplotlib.cm.ScalarMappable(norm=norm, cmap=cmap), cax=cax, orientation="horizontal",
                 label="surprisal −log₂ p(token | before), bits (grey: first token, not predicted)")
    label_figure(fig, config)
    return fig


def surprisal_html(tokens: list[str], bits: Tensor, vmax: float | None = None) -> str:
    """The same colouring as HTML spans, with each token's surprisal on hover."""
    import matplotlib
    from matplotlib.colors import Normalize, to_hex

    finite = bits[torch.isfinite(bits)]
    norm = Normalize(0.0, vmax or (float(finite.max()) if len(finite) else 1.0))
    cmap = matplotlib.colormaps[SURPRISAL_CMAP]
    out = []
    for tok, b in zip(tokens, bits.tolist()):
        bg = "#e6e6e6" if math.isnan(b) else to_hex(cmap(norm(b)))
        tip = "first token: not predicted" if math.isnan(b) else f"{b:.2f} bits"
        out.append(f'<span title="{tip}" style="background:{bg}">{html.escape(_display(tok))}</span>')
    return '<div style="font-family:monospace;line-height:1.6;white-space:pre-wrap">' + "".join(out) + "</div>"
