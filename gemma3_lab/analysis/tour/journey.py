"""One token's journey through the network: its embedding row and the √D scale, the residual
stream block by block, what attention and the MLP add, q/k before and after their norms, and
the tied head recomputed by hand."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from gemma3_lab.analysis.tour.facts import shade_globals
from gemma3_lab.config import AttentionType

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


def plot_journey(j: Journey):
    """Residual norms per layer (log scale) with what attention and the MLP add; global layers shaded.
    Right: each query head's norm before and after q_norm."""
    import matplotlib.pyplot as plt

    L = len(j.resid_pre)
    x = range(L)
    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.2), layout="constrained")
    shade_globals(a, j.layer_types)
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
    shade_globals(b, j.layer_types)
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
