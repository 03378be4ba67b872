"""Facts and per-layer numbers for a guided tour of Gemma 3: where the parameters are, the (1 + w)
gains of every norm, the two RoPE tables, and one token's journey through the residual stream.

The notebooks call these so that every number in their prose is computed, not typed in.
matplotlib is imported only inside the `plot_*` functions.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from .config import AttentionType

NORMS = ("pre_attention_norm", "post_attention_norm", "pre_ffw_norm", "post_ffw_norm")
QK_NORMS = ("q_norm", "k_norm")
GLOBAL_SHADE = "#dbe6f7"  # background of global layers in per-layer plots


# --------------------------------------------------------------------------- parameters
def parameter_breakdown(model) -> dict[str, int]:
    """Parameter counts by part: the embedding (also the tied head), attention, MLP, norms,
    and vision (tower + projector) when present. They sum to `model.num_parameters()`."""
    parts = {"embedding (= tied head)": 0, "attention": 0, "mlp": 0, "norms": 0, "vision + projector": 0}
    for name, p in model.named_parameters():
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
        parts[key] += p.numel()
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


# --------------------------------------------------------------------------- the journey
JOURNEY_HOOKS = ("hook_embed", "hook_embed_scaled", "final_norm.hook_normalized",
                 "blocks.*.hook_resid_pre", "blocks.*.hook_attn_out", "blocks.*.hook_mlp_out",
                 "blocks.*.hook_resid_post", "blocks.*.attn.hook_q", "blocks.*.attn.q_norm.hook_normalized",
                 "blocks.*.attn.hook_k", "blocks.*.attn.k_norm.hook_normalized")


@dataclass
class Journey:
    """One token of one prompt on its way through the network (L2 norms unless said otherwise)."""

    tokens: list[str]  # the prompt's pieces
    position: int  # which one is followed
    embed_scale: float  # the multiplier applied to the embedding row, as the model rounds it
    embed_norm: float  # the raw embedding row
    scaled_norm: float  # the row times the scale: what enters block 0
    resid_pre: Tensor  # (L,) residual entering each block
    attn_out: Tensor  # (L,) what attention adds (after post_attention_norm)
    mlp_out: Tensor  # (L,) what the MLP adds (after post_ffw_norm)
    resid_post: Tensor  # (L,) residual leaving each block
    q_raw: Tensor  # (L, N) each query head before q_norm
    q_normed: Tensor  # (L, N) after q_norm (before RoPE, which keeps norms)
    k_raw: Tensor  # (L, K)
    k_normed: Tensor  # (L, K)
    final: float  # after the final norm, what the tied head reads
    top: list[tuple[str, float]]  # the model's next-token prediction at this position
    tied_head_error: float  # max |logits - final_normed @ embedding.T| over the vocabulary
    layer_types: tuple[AttentionType, ...]

    @property
    def token(self) -> str:
        return self.tokens[self.position]


@torch.no_grad()
def token_journey(model, prompt, position: int = -1, k: int = 5) -> Journey:
    """Follow the token at `position` of `prompt` from its embedding row to the logits."""
    logits, cache = model.run_with_cache(prompt, names_filter=list(JOURNEY_HOOKS))
    ids = model.to_inputs(prompt).input_ids[0]
    pos = position % len(ids)
    L = model.config.text.num_layers
    at = lambda name: cache[name][0, pos].float()  # noqa: E731
    per_layer = lambda hook: torch.stack([at(f"blocks.{i}.{hook}").norm(dim=-1) for i in range(L)])  # noqa: E731
    final = at("final_norm.hook_normalized")
    head = final @ model.embed.weight.float().T  # the tied head, by hand
    row = logits[0, pos].float()
    probs = row.softmax(-1)
    top = torch.topk(probs, k)
    piece = model.tokenizer.id_to_token
    return Journey(
        tokens=[piece(int(i)) for i in ids],
        position=pos,
        embed_scale=float(torch.tensor(model.config.text.embed_scale, dtype=model.dtype)),
        embed_norm=float(at("hook_embed").norm()),
        scaled_norm=float(at("hook_embed_scaled").norm()),
        resid_pre=per_layer("hook_resid_pre"),
        attn_out=per_layer("hook_attn_out"),
        mlp_out=per_layer("hook_mlp_out"),
        resid_post=per_layer("hook_resid_post"),
        q_raw=per_layer("attn.hook_q"),
        q_normed=per_layer("attn.q_norm.hook_normalized"),
        k_raw=per_layer("attn.hook_k"),
        k_normed=per_layer("attn.k_norm.hook_normalized"),
        final=float(final.norm()),
        top=[(piece(int(i)), float(p)) for p, i in zip(top.values, top.indices)],
        tied_head_error=float((head - row).abs().max()),
        layer_types=model.config.text.layer_types,
    )


# --------------------------------------------------------------------------- attention facts
def find_tokens(model, ids, text: str) -> list[int]:
    """Positions of the first occurrence of `text`'s tokens (as they appear mid-sentence, after
    a space when `text` starts with one) inside the id list `ids`."""
    ids = ids.tolist() if isinstance(ids, Tensor) else list(ids)
    sub = model.tokenizer.encode(text, add_bos=False)
    for i in range(len(ids) - len(sub) + 1):
        if ids[i : i + len(sub)] == sub:
            return list(range(i, i + len(sub)))
    raise ValueError(f"{text!r} (tokens {sub}) does not occur in the given ids")


def attention_mass(pattern, queries, keys) -> Tensor:
    """(N,) attention each head puts on the key slots `keys`, averaged over the query slots
    `queries`, from a (B, N, S, T) pattern (batch row 0); banded patterns are expanded."""
    p = pattern.dense() if hasattr(pattern, "dense") else pattern
    q = torch.as_tensor(queries).reshape(-1)
    kk = torch.as_tensor(keys).reshape(-1)
    return p[0][:, q][:, :, kk].float().sum(-1).mean(-1)


def window_hooks(model, layers, window: int | None = None) -> list[tuple[str, object]]:
    """Hooks for `model.hooks(...)` that narrow the masks of `layers` to a sliding window
    (default: the model's own), e.g. to make the global layers local for one uncached forward.

    The hook replaces what `hook_mask` passes on, and the model attends with the mask it gets
    back; the window is the same pure function the local layers use (`masks.sliding_window`).
    """
    from .masks import sliding_window

    w = window or model.config.text.sliding_window

    def narrow(mask: Tensor, hook) -> Tensor:  # (B|1, 1, S, T): slots 0..T-1 in a full forward
        S, T = mask.shape[-2:]
        return mask & sliding_window(torch.arange(T - S, T, device=mask.device), torch.arange(T, device=mask.device), w)

    return [(f"blocks.{i}.attn.hook_mask", narrow) for i in layers]


def mass_beyond_window(pattern, window: int, first_key: int = 0) -> Tensor:
    """(N,) for a global layer's (B, N, S, T) pattern: the attention mass each head puts on keys
    at least `window` slots back — keys a sliding-window layer could not see — averaged over
    the queries that have such keys (slots >= window). Keys before slot `first_key` are left
    out (1 leaves out `<bos>`, where idle heads park their attention). NaN when the prompt is
    not that long."""
    p = pattern.dense() if hasattr(pattern, "dense") else pattern
    S, T = p.shape[-2:]
    q = torch.arange(S)[:, None]
    k = torch.arange(T)[None, :]
    far = (k <= q - window) & (k >= first_key)  # (S, T)
    rows = (k <= q - window).any(-1)
    if not bool(rows.any()):
        return torch.full((p.shape[1],), float("nan"))
    return (p[0].float() * far).sum(-1)[:, rows].mean(-1)


# --------------------------------------------------------------------------- figures
def _shade_globals(ax, layer_types) -> None:
    for i, t in enumerate(layer_types):
        if t is AttentionType.GLOBAL:
            ax.axvspan(i - 0.5, i + 0.5, color=GLOBAL_SHADE, zorder=0, lw=0)


def plot_journey(j: Journey):
    """Residual norms per layer (log scale) with what attention and the MLP add; global layers shaded.
    Right: each query head's norm before and after q_norm."""
    import matplotlib.pyplot as plt

    L = len(j.resid_pre)
    x = range(L)
    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.2), layout="constrained")
    _shade_globals(a, j.layer_types)
    a.plot(x, j.resid_post, "o-", color="#222", label="residual after the block")
    a.plot(x, j.attn_out, "s--", color="#d1495b", label="attention adds")
    a.plot(x, j.mlp_out, "^--", color="#00798c", label="MLP adds")
    a.axhline(j.scaled_norm, color="#999", ls=":", label=f"scaled embedding ({j.scaled_norm:.1f})")
    a.set_yscale("log")
    a.set_xticks(list(x))
    a.set_xlabel("layer (shaded: global)")
    a.set_ylabel("L2 norm")
    a.set_title(f"The residual stream at token {j.position} {j.token!r}")
    a.legend(fontsize=8)
    _shade_globals(b, j.layer_types)
    for h in range(j.q_raw.shape[1]):
        b.plot(x, j.q_raw[:, h], "o-", ms=3, lw=1, color=plt.cm.Reds(0.4 + 0.15 * h), label=f"q head {h} raw")
    b.plot(x, j.q_normed.mean(1), "o-", color="#2e9e4f", label="q after q_norm (head mean)")
    b.plot(x, j.k_normed.mean(1), "s-", color="#7b2cbf", label="k after k_norm")
    b.set_yscale("log")
    b.set_xticks(list(x))
    b.set_xlabel("layer (shaded: global)")
    b.set_title("Query and key norms, before and after q/k norm")
    b.legend(fontsize=7, ncol=2)
    return fig


def plot_norm_gains(g: NormGains):
    """Mean (1 + w) of each of the four sandwich norms per layer, and of q/k norm (log scale)."""
    import matplotlib.pyplot as plt

    L = len(g.layer_types)
    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 3.8), layout="constrained")
    for ax, names in ((a, NORMS), (b, QK_NORMS)):
        _shade_globals(ax, g.layer_types)
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
