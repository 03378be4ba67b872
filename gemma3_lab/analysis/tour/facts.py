"""Architecture facts of a loaded Gemma 3: where the parameters are, the (1 + w) gains of every
RMSNorm, the two RoPE tables, the KV cache per token — and their figures."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from gemma3_lab.config import AttentionType
from gemma3_lab.loading.quantize import weight_counts

NORMS = ("pre_attention_norm", "post_attention_norm", "pre_ffw_norm", "post_ffw_norm")
QK_NORMS = ("q_norm", "k_norm")
GLOBAL_SHADE = "#dbe6f7"  # background of global layers in per-layer plots


# --------------------------------------------------------------------------- parameters
def parameter_breakdown(model) -> dict[str, int]:
    """Parameter counts by part: the embedding (also the tied head), attention, MLP, norms,
    and vision (tower + projector) when present. They sum to `model.num_parameters()`."""
    parts = {"embedding (= tied head)": 0, "attention": 0, "mlp": 0, "norms": 0, "vision + projector": 0}
    for name, n in weight_counts(model):  # quantized projections count as their float weights
        if name.startswith(("vision.", "projector.")):
            key = "vision + projector"
        elif name.startswith(("embed.", "lm_head.")):
            key = "embedding (= tied head)"
        elif "norm" in name:  # q_norm / k_norm live under attn but are norms
            key = "norms"
        elif ".attn." in name:
            key = "attention"
        elif ".mlp." in name:
            key = "mlp"
        else:
            raise ValueError(f"parameter {name} belongs to no part")
        parts[key] += n
    return {k: v for k, v in parts.items() if v or k != "vision + projector"}


def kv_bytes_per_token(config, dtype: torch.dtype = torch.float32) -> int:
    """Bytes of key and value cache one token costs across all layers (every kv head)."""
    t = config.text
    return 2 * t.num_layers * t.num_kv_heads * t.head_dim * torch.finfo(dtype).bits // 8


# --------------------------------------------------------------------------- norms
@dataclass
class NormGains:
    """Statistics of the effective per-channel gain (1 + w) of every RMSNorm, per layer."""

    mean: dict[str, Tensor]  # norm name -> (L,) mean of (1 + w) over channels
    min: dict[str, Tensor]  # (L,)
    max: dict[str, Tensor]  # (L,)
    final: tuple[float, float, float]  # (mean, min, max) of the final norm
    layer_types: tuple[AttentionType, ...]


@torch.no_grad()
def norm_gains(model) -> NormGains:
    """The (1 + w) gains of the four sandwich norms and q/k norm in every block, and the final norm.

    Gemma stores w, an offset from 1 that starts at zero (model/norm.py); what multiplies the
    normalised vector is 1 + w.
    """
    stats: dict[str, list[list[float]]] = {n: [] for n in NORMS + QK_NORMS}
    for b in model.blocks:
        for n in NORMS + QK_NORMS:
            g = 1.0 + (getattr(b, n) if n in NORMS else getattr(b.attn, n)).weight.float()
            stats[n].append([float(g.mean()), float(g.min()), float(g.max())])
    f = 1.0 + model.final_norm.weight.float()
    col = lambda i: {n: torch.tensor([r[i] for r in rows]) for n, rows in stats.items()}  # noqa: E731
    return NormGains(col(0), col(1), col(2), (float(f.mean()), float(f.min()), float(f.max())),
                     model.config.text.layer_types)


# --------------------------------------------------------------------------- RoPE
def rope_wavelengths(model) -> dict[str, Tensor]:
    """{"local": (H/2,), "global": (H/2,)}: tokens for each frequency pair to turn a full circle,
    2π / ω_i, from the frequencies the model really uses (linear scaling included)."""
    return {t.short: 2 * math.pi / getattr(model, f"inv_freq_{t.short}").double() for t in AttentionType}


def full_turns_within(model, distance: int) -> dict[str, int]:
    """How many of each table's frequency pairs complete a full turn within `distance` tokens:
    those can tell positions apart only modulo their wavelength; the rest vary slowly."""
    return {k: int((w <= distance).sum()) for k, w in rope_wavelengths(model).items()}


# --------------------------------------------------------------------------- figures
def shade_globals(ax, layer_types) -> None:
    """Shade the global layers' columns of a per-layer plot."""
    for i, t in enumerate(layer_types):
        if t is AttentionType.GLOBAL:
            ax.axvspan(i - 0.5, i + 0.5, color=GLOBAL_SHADE, zorder=0, lw=0)


def plot_norm_gains(g: NormGains):
    """Mean (1 + w) of each of the four sandwich norms per layer, and of q/k norm (log scale)."""
    import matplotlib.pyplot as plt

    L = len(g.layer_types)
    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 3.8), layout="constrained")
    for ax, names in ((a, NORMS), (b, QK_NORMS)):
        shade_globals(ax, g.layer_types)
        for n in names:
            ax.plot(range(L), g.mean[n], "o-", ms=4, label=n)
        ax.axhline(1.0, color="#999", ls=":", lw=1)
        ax.set_yscale("log")
        ax.set_xticks(range(L))
        ax.set_xlabel("layer (shaded: global)")
        ax.legend(fontsize=8)
    a.set_ylabel("mean of (1 + w) over channels")
    a.set_title("The four sandwich norms")
    b.set_title("q_norm and k_norm (per head dim)")
    return fig


def plot_rope(model):
    """Wavelength of every RoPE frequency pair, local vs global table, against the window and context."""
    import matplotlib.pyplot as plt

    t = model.config.text
    waves = rope_wavelengths(model)
    fig, ax = plt.subplots(figsize=(8, 3.8), layout="constrained")
    for kind, w in waves.items():
        rope = t.rope_local if kind == "local" else t.rope_global
        scaled = f", linear ×{rope.factor:g}" if rope.scaling == "linear" else ""
        ax.plot(w, label=f"{kind} layers: θ = {rope.theta:,.0f}{scaled}")
    ax.axhline(t.sliding_window, color="#d1495b", ls="--", lw=1, label=f"sliding window ({t.sliding_window})")
    ax.axhline(t.max_position_embeddings, color="#555", ls=":", lw=1,
               label=f"context ({t.max_position_embeddings:,})")
    ax.set_yscale("log")
    ax.set_xlabel(f"frequency pair i (of {t.head_dim // 2})")
    ax.set_ylabel("wavelength 2π/ωᵢ (tokens)")
    ax.set_title("The two RoPE tables")
    ax.legend(fontsize=8)
    return fig
