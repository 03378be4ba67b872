"""Logit lens: read the residual stream after every layer through the model's own final norm
and tied unembedding, as if the network stopped there (nostalgebraist, 2020).

Gemma's final norm has its (1 + w) scale and the head is the unscaled embedding (spec §2.7),
so the last row equals the model's real next-token distribution.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

LENS_ROWS = 64  # positions per chunk: one chunk of (rows, V) float32 probabilities at a time


@dataclass
class LogitLens:
    """Top-k predictions per layer and position; row 0 is the embedding, row i+1 layer i."""

    layer_labels: list[str]  # "embed", "L0", ..., "L17"
    tokens: list[str]  # the input token at each position shown
    top_ids: Tensor  # (n_layers + 1, S, k) long
    top_probs: Tensor  # (n_layers + 1, S, k) float32
    top_tokens: list[list[list[str]]]  # [layer][position][rank]
    positions: list[int] | None = None  # the query positions shown (None: all, in order)


def residuals(cache, batch: int = 0) -> list[Tensor]:
    """[(S, D)] the residual entering block 0, then after each block, from a cache."""
    n = cache.model.config.text.num_layers
    names = ["blocks.0.hook_resid_pre"] + [f"blocks.{i}.hook_resid_post" for i in range(n)]
    missing = [m for m in names if m not in cache]
    if missing:
        raise KeyError(
            f"the logit lens needs the residual stream, but this cache lacks {', '.join(missing[:3])}"
            f"{' ...' if len(missing) > 3 else ''}: capture names_filter=['blocks.0.hook_resid_pre', "
            "'blocks.*.hook_resid_post'] (with layers=None)"
        )
    return [cache[m][batch] for m in names]


@torch.no_grad()
def lens(model, resids: list[Tensor], k: int = 5) -> tuple[Tensor, Tensor]:
    """(top_ids, top_probs), each (len(resids), S, k): final norm -> unembed -> softmax -> top-k."""
    ids, probs = [], []
    for r in resids:
        li, lp = [], []
        for i in range(0, r.shape[0], LENS_ROWS):
            h = model.final_norm(r[i : i + LENS_ROWS].to(device=model.device, dtype=model.dtype))
            p = torch.softmax(model._unembed(h).float(), dim=-1)
            t = torch.topk(p, k, dim=-1)
            li.append(t.indices)
            lp.append(t.values)
        ids.append(torch.cat(li))
        probs.append(torch.cat(lp))
    return torch.stack(ids).cpu(), torch.stack(probs).cpu()


def logit_lens(cache, k: int = 5, batch: int = 0) -> LogitLens:
    """The logit lens of one batch row of an ActivationCache (captured residuals required)."""
    model = cache.model
    top_ids, top_probs = lens(model, residuals(cache, batch), k)
    ids = cache.input_ids[batch]
    pos = cache.positions
    shown = ids[pos] if pos is not None else ids
    piece = model.tokenizer.id_to_token if model.tokenizer is not None else str
    return LogitLens(
        layer_labels=["embed"] + [f"L{i}" for i in range(model.config.text.num_layers)],
        tokens=[piece(int(t)) for t in shown],
        top_ids=top_ids,
        top_probs=top_probs,
        top_tokens=[[[piece(int(t)) for t in row] for row in layer] for layer in top_ids],
        positions=pos.tolist() if pos is not None else None,
    )
