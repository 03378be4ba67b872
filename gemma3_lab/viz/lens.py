"""Reading the residual stream: the logit-lens grid (layers × positions, top-1 token coloured by
its probability), the residual norm per layer, and a text coloured by each token's surprisal."""

from __future__ import annotations

import html
import math

import torch
from torch import Tensor

from .common import label_figure, shorten

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
            ax.text(c, r, shorten(lens.top_tokens[r][col][0], 9), ha="center", va="center", fontsize=6.5,
                    color="black" if p > 0.55 else "white")
    shown = [lens.tokens[c] for c in cols]
    pos = lens.positions if getattr(lens, "positions", None) else list(range(lens.top_probs.shape[1]))
    ax.set_xticks(range(C), [f"{shorten(t, 12)} ({pos[c]})" for t, c in zip(shown, cols)], rotation=60,
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


def surprisal_text(tokens: list[str], bits: Tensor, line_chars: int = 90, config=None, vmax: float | None = None):
    """The text token by token on a background coloured by surprisal (bits); slot 0 unscored."""
    import matplotlib
    import matplotlib.pyplot as plt
    from matplotlib.colors import Normalize

    finite = bits[torch.isfinite(bits)]
    vmax = vmax or (float(finite.max()) if len(finite) else 1.0)
    norm = Normalize(0.0, vmax)
    cmap = matplotlib.colormaps[SURPRISAL_CMAP]
    # lay out in character cells (monospace) so wrapping is exact
    placed, x, y = [], 0, 0
    for tok in tokens:
        text = _display(tok)
        if x + len(text) > line_chars and x > 0:
            x, y = 0, y + 1
        placed.append((x, y, text))
        x += len(text)
        if tok.endswith("\\n"):
            x, y = 0, y + 1
    lines = y + 1
    fig, ax = plt.subplots(figsize=(0.105 * line_chars + 1.5, 0.32 * lines + 1.3), layout="constrained")
    for (x, y, text), b in zip(placed, bits.tolist()):
        fc = "#e6e6e6" if math.isnan(b) else cmap(norm(b))
        ax.text(x, y, text, family="monospace", fontsize=9, ha="left", va="center",
                bbox=dict(boxstyle="square,pad=0.12", fc=fc, ec="none"))
    ax.set_xlim(-0.5, line_chars + 0.5)
    ax.set_ylim(lines - 0.4, -0.6)
    ax.axis("off")
    sm = matplotlib.cm.ScalarMappable(norm=norm, cmap=cmap)
    fig.colorbar(sm, ax=ax, orientation="horizontal", shrink=0.5, pad=0.02,
                 label="surprisal −log₂ p(token | before), bits (grey: first token, not predicted)")
    mean = float(finite.mean()) if len(finite) else float("nan")
    ax.set_title(f"Surprisal per token · mean {mean:.2f} bits over {len(finite)} predicted tokens", fontsize=10)
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
