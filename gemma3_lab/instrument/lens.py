"""Logit lens: read the residual stream after every layer through the model's own final norm
and tied unembedding, as if the network stopped there (nostalgebraist, 2020).

Gemma's final norm has its (1 + w) scale and the head is the unscaled embedding (docs/gemma3.md §2.7),
so the last row equals the model's real next-token distribution.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

VOCAB_BYTES = 4 * 2**20  # logits of one vocabulary chunk for all rows of a group: one buffer, reused
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
    chunks would stream its V × D matrix once per chunk, several times slower on a CPU. Each
    chunk is computed as head_chunk @ rows.T into one reused buffer (a fresh 16 MB tensor per
    chunk costs page faults, and this orientation runs a few rows far faster, see
    `kernels.rows_times`). With `logsumexp`, softmax probabilities follow as exp(value - logsumexp).
    """
    lead, D = h.shape[:-1], h.shape[-1]
    rows = h.reshape(-1, D).to(device=model.device, dtype=model.dtype)
    head = model.lm_head.weight if model.lm_head is not None else model.embed.weight
    V = head.shape[0]
    outs = []
    for g in range(0, rows.shape[0], ROW_GROUP):
        rT = rows[g : g + ROW_GROUP].T.contiguous()  # (D, R)
        R = rT.shape[1]
        step = max(k, min(V, VOCAB_BYTES // (4 * R)))
        buf = torch.empty(step, R, dtype=head.dtype, device=head.device)
        vals = torch.empty(0, R, dtype=head.dtype, device=head.device)
        ids = torch.empty(0, R, dtype=torch.long, device=head.device)
        m = torch.full((R,), -torch.inf, device=head.device)
        s = torch.zeros(R, device=head.device)
        for a in range(0, V, step):
            w = head[a : a + step]
            logits = model.softcap(torch.mm(w, rT, out=buf[: w.shape[0]]))  # (Vc, R)
            t = torch.topk(logits, min(k, logits.shape[0]), dim=0)
            cv, ci = torch.cat((vals, t.values)), torch.cat((ids, t.indices + a))  # merge with the best so far
            t = torch.topk(cv, min(k, cv.shape[0]), dim=0)
            vals, ids = t.values, ci.gather(0, t.indices)
            if logsumexp:  # running log-sum-exp in float32, rescaled as the maximum grows
                f = logits if logits.dtype == torch.float32 else logits.float()
                nm = torch.maximum(m, f.amax(0))
                s.mul_((m - nm).exp()).add_(f.sub_(nm).exp_().sum(0))  # f is spent: the top-k are taken
                m = nm
        outs.append((vals.T, ids.T) + ((m + s.log(),) if logsumexp else ()))
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
