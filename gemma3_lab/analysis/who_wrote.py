""""Who wrote this token?" for one (sequence, position, token): direct logit attribution per
layer (attention / MLP) and per head, and integrated gradients per input token — the numbers
the app's inspector shows and `viz.attribution` draws, each with its check."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from gemma3_lab.analysis.attribution import integrated_gradients

_NEEDED = ["hook_inputs_embeds", "final_norm.hook_scale", "final_norm.hook_normalized", "blocks.*.hook_attn_out", "blocks.*.hook_mlp_out",
           "blocks.*.attn.hook_z", "blocks.*.post_attention_norm.hook_scale"]


@dataclass
class WhoWrote:
    """Where the logit of `token` at `position` came from."""

    position: int  # the position whose prediction is explained (the token follows it)
    token: int
    token_str: str
    logit: float  # the model's logit of `token` there
    embed: float  # DLA of the scaled embedding (image features included)
    attn: Tensor  # (L,) float64 DLA of each layer's attention output
    mlp: Tensor  # (L,) float64 DLA of each layer's MLP output
    heads: Tensor  # (L, N) float64 DLA of each head (rows sum to `attn`)
    tokens: list[str]  # the input tokens, as `to_str_tokens` writes them
    input_attr: Tensor | None  # (S,) float64 integrated gradients per input token, or None
    completeness_error: float | None  # of the integrated gradients

    @property
    def dla_error(self) -> float:
        """|embed + Σ attn + Σ mlp − logit|: zero up to float32 rounding."""
        return abs(self.embed + float(self.attn.sum() + self.mlp.sum()) - self.logit)


def _token(model, ids: Tensor, p: int, logits: Tensor, token) -> int:
    if token is not None:
        return int(token)
    return int(ids[0, p + 1]) if p + 1 < ids.shape[1] else int(logits[0, 0].argmax())


@torch.no_grad()
def _dla(model, x, p: int, token) -> tuple:
    """One forward keeping position p only: (token, logit, embed, attn (L,), mlp (L,), heads (L, N))."""
    _, cache = model.run_with_cache(x, names_filter=_NEEDED, positions=[p], top_k=0, return_logits=False)
    logits = model._unembed(cache["final_norm.hook_normalized"])  # (1, 1, V): the head, at p only
    token = _token(model, x.input_ids, p, logits, token)
    parts = cache.logit_attrs(cache.decompose_resid(), token)[:, 0, 0].double()  # (1 + 2L,)
    heads = cache.logit_attrs(cache.stack_head_results(), token)[:, 0, 0].double()
    L, N = model.config.text.num_layers, model.config.text.num_heads
    return token, float(logits[0, 0, token]), float(parts[0]), parts[1::2], parts[2::2], heads.view(L, N)


def who_wrote(model, inputs, position: int = -1, token: int | None = None, input_attribution: bool = True,
              steps: int = 64) -> WhoWrote:
    """Explain the logit of `token` at `position` of `inputs` (text, ids or Inputs, one
    sequence: a prompt plus what was generated). Default token: the one that follows
    `position` in the sequence (what was written there), else the top prediction.
    `input_attribution=False` skips the integrated gradients (`steps` backward passes)."""
    x = model.to_inputs(inputs)
    S = x.input_ids.shape[1]
    if not -S <= position < S:
        raise ValueError(f"position {position} is outside the {S} tokens of this sequence")
    p = position % S
    token, logit, embed, attn, mlp, heads = _dla(model, x, p, token)
    ig = integrated_gradients(model, x, p, token, steps=steps) if input_attribution else None
    pieces = model.to_str_tokens(x.input_ids[0]) if model.tokenizer is not None else [str(int(i)) for i in x.input_ids[0]]
    name = model.to_string([token]) if model.tokenizer is not None else str(token)
    return WhoWrote(p, token, name, logit, embed, attn, mlp, heads, pieces,
                    None if ig is None else ig.values, None if ig is None else ig.completeness_error)
