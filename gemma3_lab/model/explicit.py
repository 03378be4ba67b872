"""The explicit-softmax attention path, in chunks of query rows so that no (N, T, T) tensor
needs to exist unless a hook asks for one.

Numerics are transformers' eager path (spec §2.3): scores · scale, an additive finfo.min
mask, a float32 softmax cast back, then pattern @ v. Global layers (and any layer whose
mask a hook replaced) use `DenseRows`; local layers use `BandRows`, which only ever
touches the keys a query's window (or its own image) can reach.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .banded import BandedPattern, skew, unskew

CHUNK_BYTES = 64 * 2**20  # float32 scores of one chunk of query rows (prompts up to ~4k: one chunk)


def _additive(mask: Tensor, dtype: torch.dtype) -> Tensor:
    """0 where allowed, finfo.min where not: added (not filled) so scores match eager bit for bit."""
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, torch.finfo(dtype).min)


def _raw(x) -> Tensor:
    return x.band if isinstance(x, BandedPattern) else x


class DenseRows:
    """Each query row against all T keys."""

    def __init__(self, q: Tensor, k: Tensor, v: Tensor, plan, mask: Tensor | None, scale: float) -> None:
        self.q, self.k, self.v, self.plan, self.mask, self.scale = q, k, v, plan, mask, scale
        B, N, S, _ = q.shape
        self.shape = (B, N, S, k.shape[2])
        self.rows_per_chunk = max(1, CHUNK_BYTES // (B * N * k.shape[2] * 4))

    def wrap(self, x: Tensor, fill: float) -> Tensor:
        return x

    def empty(self, dtype: torch.dtype, fill: float) -> Tensor:
        return torch.empty(self.shape, dtype=dtype, device=self.q.device)

    def scores(self, a: int, b: int) -> Tensor:
        s = torch.matmul(self.q[:, :, a:b], self.k.transpose(2, 3)) * self.scale  # (B, N, C, T)
        m = self.mask[:, :, a:b] if self.mask is not None else self.plan.rows(a, b)
        return s + _additive(m, s.dtype)

    def apply(self, p: Tensor, a: int, b: int) -> Tensor:
        return torch.matmul(p, self.v)  # (B, N, C, H)


class BandRows:
    """Each query row against the `width` keys from `back` slots before it to the end of its
    image: column j of row i is key slot q_i - back + j."""

    def __init__(self, q: Tensor, k: Tensor, v: Tensor, plan, scale: float) -> None:
        self.q, self.plan, self.scale = q, plan, scale
        self.back, fwd = plan.band_extent()
        self.width = self.back + 1 + fwd
        # padded key index of slot s is s - k0 + back, so row a's band starts at q_a - k0
        self.kp = F.pad(k, (0, 0, self.back, fwd))  # (B, N, back + T + fwd, H)
        self.vp = F.pad(v, (0, 0, self.back, fwd))
        self.k0, self.kv_len = int(plan.kv_slots[0]), k.shape[2]
        B, N, S, _ = q.shape
        self.shape = (B, N, S, self.width)
        # a chunk of C rows multiplies C + width - 1 keys: half a window keeps that waste at 1.5x
        self.rows_per_chunk = max(16, (plan.window or self.width) // 2)

    def _keys(self, a: int, b: int) -> slice:
        start = int(self.plan.q_slots[a]) - self.k0
        return slice(start, start + (b - a) + self.width - 1)

    def wrap(self, x: Tensor, fill: float) -> BandedPattern:
        return BandedPattern(x, self.plan.q_slots, self.back, self.k0, self.kv_len, fill)

    def empty(self, dtype: torch.dtype, fill: float) -> BandedPattern:
        return self.wrap(torch.empty(self.shape, dtype=dtype, device=self.q.device), fill)

    def scores(self, a: int, b: int) -> Tensor:
        s = torch.matmul(self.q[:, :, a:b], self.kp[:, :, self._keys(a, b)].transpose(2, 3)) * self.scale
        s = skew(s, self.width)  # (B, N, C, width)
        return s + _additive(self.plan.band_rows(a, b, self.back, self.width), s.dtype)

    def apply(self, p: Tensor, a: int, b: int) -> Tensor:
        return torch.matmul(unskew(p), self.vp[:, :, self._keys(a, b)])  # (B, N, C, H)


def explicit_attention(q, k, v, plan, mask, scale, hook_scores, hook_pattern, store_dtype=None) -> Tensor:
    """(B, N, S, H) attention output. q, k, v are (B, N, S|T, H) with kv heads already repeated.

    `mask` is the dense mask when `hook_mask` is hooked (maybe replaced), else None. Scores and
    pattern are built only when their hook point is hooked, in `store_dtype` if given: the
    output is then still computed from full-precision rows, unless a hook returns a new tensor.
    """
    banded = plan.window is not None and (mask is None or mask is plan.dense)
    geo = BandRows(q, k, v, plan, scale) if banded else DenseRows(q, k, v, plan, mask, scale)
    dt = q.dtype
    sd = store_dtype or dt
    S = q.shape[2]
    chunks = [(a, min(a + geo.rows_per_chunk, S)) for a in range(0, S, geo.rows_per_chunk)]
    whole = len(chunks) == 1 and sd == dt  # one chunk in the model dtype: hand over as computed, no copy
    min_fill = float(torch.tensor(torch.finfo(dt).min, dtype=dt).to(sd))  # as stored

    src = None  # the scores to take the softmax of, when a hook has seen (or replaced) them
    if hook_scores.active:
        if whole:
            full = geo.wrap(geo.scores(0, S), min_fill)
        else:
            full = geo.empty(sd, min_fill)
            for a, b in chunks:
                _raw(full)[:, :, a:b] = geo.scores(a, b)
        seen = hook_scores(full)
        if seen is not full or sd == dt:
            src = seen
            if banded and not isinstance(seen, BandedPattern):  # a hook gave dense scores back
                geo = DenseRows(q, k, v, plan, plan.dense, scale)

    def rows(a: int, b: int) -> Tensor:
        s = _raw(src)[:, :, a:b].to(dt) if src is not None else geo.scores(a, b)
        return torch.softmax(s, dim=-1, dtype=torch.float32).to(dt)

    if not hook_pattern.active:
        return _cat([geo.apply(rows(a, b), a, b) for a, b in chunks])

    if whole:
        pat = geo.wrap(rows(0, S), 0.0)
        seen = hook_pattern(pat)
    else:
        pat = geo.empty(sd, 0.0)
        zs = []
        for a, b in chunks:
            p = rows(a, b)
            _raw(pat)[:, :, a:b] = p
            if sd != dt:  # the stored copy is rounded: take the output from the exact rows
                zs.append(geo.apply(p, a, b))
        seen = hook_pattern(pat)
        if seen is pat and sd != dt:
            return _cat(zs)
    # the pattern as the hook left it (edited in place, or replaced) gives the output
    if isinstance(seen, BandedPattern) != isinstance(geo, BandRows):
        geo = BandRows(q, k, v, plan, scale) if isinstance(seen, BandedPattern) else DenseRows(q, k, v, plan, None, scale)
    return _cat([geo.apply(_raw(seen)[:, :, a:b].to(dt), a, b) for a, b in chunks])


def _cat(zs: list[Tensor]) -> Tensor:
    return zs[0] if len(zs) == 1 else torch.cat(zs, dim=2)
