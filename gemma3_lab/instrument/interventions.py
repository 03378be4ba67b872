"""Ready-made interventions: each returns `(name, fn)` hook pairs for `model.hooks(...)`,
`model.run_with_hooks(fwd_hooks=...)`, or around `model.generate` (`with model.hooks(pairs):`).

Positions are absolute slots: in a decode step the hook learns where its token sits from
`hook_slots`, so "position 7" means the same token in a prefill and while generating.
"""

from __future__ import annotations

from typing import Iterable

import torch
from torch import Tensor

from gemma3_lab.config import kv_heads_of
from gemma3_lab.errors import Gemma3LabError, number
from gemma3_lab.instrument.activation_cache import ActivationCache, canonical, layout
from gemma3_lab.instrument.capture import SlotTracker
from gemma3_lab.model.banded import BandedPattern, PatternView

Hooks = list[tuple[str, object]]


def _heads(name: str, heads, n_rep: int) -> list[int] | None:
    if heads is None:
        return None
    heads = [heads] if isinstance(heads, int) else list(heads)
    return kv_heads_of(heads, n_rep) if layout(name).kv_heads else heads


def ablate_heads(layer: int, heads: int | Iterable[int], mode: str = "zero", means=None) -> Hooks:
    """Silence query heads of one layer at `hook_z` (their output before o_proj).

    mode="zero" writes zeros; mode="mean" writes each head's mean output over batch and
    positions of a reference run: `means` is an ActivationCache holding this layer's
    `attn.hook_z`, or a (N, H) tensor.
    """
    name = f"blocks.{layer}.attn.hook_z"
    heads = [heads] if isinstance(heads, int) else list(heads)
    if mode == "zero":
        fill = None
    elif mode == "mean":
        if means is None:
            raise ValueError("mode='mean' needs means: an ActivationCache with " + name + " or an (N, H) tensor")
        fill = means[name].mean(dim=(0, 1)) if isinstance(means, ActivationCache) else means  # (N, H)
    else:
        raise ValueError(f"mode must be 'zero' or 'mean', not {mode!r}")

    def fn(z, hook):
        z = z.clone()
        for h in heads:
            z[:, :, h] = 0.0 if fill is None else fill[h].to(z.dtype)
        return z

    return [(name, fn)]


def patch(source: ActivationCache, names: str | Iterable[str], positions: Iterable[int] | None = None,
          heads: int | Iterable[int] | None = None) -> Hooks:
    """Activation patching: overwrite activations with the same hook points' values in `source`.

    `positions` (absolute slots, default all present in both) and `heads` (query heads; k/v:
    the kv heads they read) narrow what is copied. `source` must keep those positions.
    """
    names = [canonical(n) for n in ([names] if isinstance(names, str) else names)]
    slots = SlotTracker()
    src_pos = source.positions

    def make(name):
        lay = layout(name)
        if lay.seq is None:
            raise ValueError(f"{name} is not per token: patch it whole with a hook of your own")
        src = source[name]
        src_heads = _heads(name, heads, _n_rep(source))

        def fn(t, hook):
            rows, pos = slots.rows(positions)
            # where each wanted position sits in the source cache
            have = torch.arange(_len(src, lay)) if src_pos is None else src_pos
            match = have[:, None] == pos[None, :]
            keep = match.any(0)
            rows, src_rows = rows[keep], match[:, keep].float().argmax(0)
            if not len(rows):
                return None
            # bands are patched as bands; row blocks of a long global pattern as the dense tensor
            out = t.clone() if isinstance(t, (Tensor, BandedPattern)) else t.dense()
            dst = out.band if isinstance(out, BandedPattern) else out
            s = src.band if isinstance(src, BandedPattern) else src.to_dense()
            hsel = slice(None) if src_heads is None else torch.tensor(src_heads)
            if lay.head is None:
                _put(dst, lay.seq, rows, _take(s, lay.seq, src_rows).to(dst.dtype))
            else:  # copy only the chosen heads
                piece = _take(s, lay.seq, src_rows)
                cur = _take(dst, lay.seq, rows)
                idx = [slice(None)] * cur.dim()
                idx[lay.head] = hsel
                cur[tuple(idx)] = piece[tuple(idx)].to(dst.dtype)
                _put(dst, lay.seq, rows, cur)
            return out

        return (name, fn)

    return [slots.pair()] + [make(n) for n in names]


MAX_STEER_SCALE = 1e6  # residual norms are in the hundreds; beyond this only overflow remains


def steer(name: str, vector: Tensor, scale: float = 1.0, positions: Iterable[int] | None = None) -> Hooks:
    """Add `scale * vector` (D,) to the activation at `name` (e.g. `blocks.6.hook_resid_post`),
    at every position or only at the given absolute slots. `|scale|` is at most MAX_STEER_SCALE
    and `scale * vector` must be finite: a NaN or overflowing edit would turn every logit to NaN."""
    name = canonical(name)
    scale = number("steering scale", scale, low=-MAX_STEER_SCALE, high=MAX_STEER_SCALE)
    if not bool(torch.isfinite(vector).all()) or not bool(torch.isfinite(scale * vector.float()).all()):
        raise Gemma3LabError(f"steering vector for {name}: scale {scale:g} × vector has NaN or inf values")
    slots = SlotTracker()

    def fn(t, hook):
        v = (scale * vector).to(device=t.device, dtype=t.dtype)
        if not bool(torch.isfinite(v).all()):
            raise Gemma3LabError(f"steering at {name}: scale {scale:g} × vector overflows {t.dtype}")
        if positions is None:
            return t + v
        rows, _ = slots.rows(positions)
        out = t.clone()
        out[:, rows.to(t.device)] += v
        return out

    return [slots.pair(), (name, fn)]


def for_row(hooks: Hooks, row: int) -> Hooks:
    """The same hooks acting on one row of a batch only (the other rows pass unchanged), for
    batched generations with an intervention per row (`gemma3_lab.generate_batch`)."""
    out = []
    for name, fn in hooks:
        if name == "hook_slots":  # (S,): the slots are the same for every row
            out.append((name, fn))
            continue

        def on_row(t, hook, fn=fn, name=name):
            if not isinstance(t, Tensor):
                raise ValueError(f"{name}: a per-row intervention needs a plain tensor, not {type(t).__name__}")
            got = fn(t[row : row + 1], hook)
            if got is None:
                return None
            t = t.clone()
            t[row : row + 1] = got
            return t

        out.append((name, on_row))
    return out


def _n_rep(cache: ActivationCache) -> int:
    return cache.model.config.text.n_rep if cache.model is not None else 1


def _len(t, lay) -> int:
    return len(t.q_slots) if isinstance(t, PatternView) else t.shape[lay.seq]


def _take(t: Tensor, axis: int, rows: Tensor) -> Tensor:
    return t.index_select(axis, rows.to(t.device))


def _put(t: Tensor, axis: int, rows: Tensor, values: Tensor) -> None:
    t.index_copy_(axis, rows.to(t.device), values)
