"""Logit lens: read the residual stream after every layer through the model's own final norm
and tied unembedding, as if the network stopped there (nostalgebraist, 2020).

Gemma's final norm has its (1 + w) scale and the head is the unscaled embedding (docs/gemma3.md §2.7),
so the last row equals the model's real next-token distribution.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

VOCAB_BYTES = 16 * 2**20  # float32 logits of one vocabulary chunk, for all rows of a group
ROW_GROUP = 4096  # rows sharing one pass over the head


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
def top_logits(model, h: Tensor, k: int, logsumexp: bool = False) -> tuple[Tensor, ...]:
    """(values, ids[, logsumexp]) of the top-k logits of every row of h (..., D).

    The head is read in vocabulary chunks, once per group of rows: position-by-position
    chunks would stream its V × D matrix once per chunk, several times slower on a CPU.
    With `logsumexp`, softmax probabilities follow as exp(value - logsumexp).
    """
    lead, D = h.shape[:-1], h.shape[-1]
    rows = h.reshape(-1, D).to(device=model.device, dtype=model.dtype)
    V = model.config.text.vocab_size
    outs = []
    for g in range(0, rows.shape[0], ROW_GROUP):
        r = rows[g : g + ROW_GROUP]
        step = max(k, VOCAB_BYTES // (4 * r.shape[0]))
        vals = ids = m = s = None
        for a in range(0, V, step):
            logits = model._unembed(r, vocab=slice(a, a + step))  # (R, Vc)
            t = torch.topk(logits, min(k, logits.shape[-1]), dim=-1)
            cv, ci = t.values, t.indices + a
            if vals is not None:  # merge with the best so far
                cv, ci = torch.cat((vals, cv), -1), torch.cat((ids, ci), -1)
                t = torch.topk(cv, k, dim=-1)
                cv, ci = t.values, ci.gather(-1, t.indices)
            vals, ids = cv, ci
            if logsumexp:  # running log-sum-exp in float32, rescaled as the maximum grows
                f = logits.float()
                cm = f.amax(-1)
                if m is None:
                    m, s = cm, (f - cm[:, None]).exp().sum(-1)
                else:
                    nm = torch.maximum(m, cm)
                    s = s * (m - nm).exp() + (f - nm[:, None]).exp().sum(-1)
                    m = nm
        outs.append((vals, ids) + ((m + s.log(),) if logsumexp else ()))
    return tuple(torch.cat(parts).reshape(*lead, *parts[0].shape[1:]) for parts in zip(*outs))


@torch.no_grad()
def lens(model, resids: list[Tensor], k: int = 5) -> tuple[Tensor, Tensor]:
    """(top_ids, top_probs), each (len(resids), S, k): final norm -> unembed -> softmax -> top-k."""
    h = model.final_norm(torch.stack(resids).to(device=model.device, dtype=model.dtype))  # (L+1, S, D)
    vals, ids, lse = top_logits(model, h, k, logsumexp=True)
    return ids.cpu(), (vals.float() - lse[..., None]).exp().cpu()


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
