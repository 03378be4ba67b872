"""The explicit-softmax attention path, in chunks of query rows so that no (N, T, T) tensor
needs to exist unless a hook asks for one.

Numerics are transformers' eager path (spec §2.3): scores · scale, an additive finfo.min
mask, a float32 softmax cast back, then pattern @ v. Global layers (and any layer whose
mask a hook replaced) use `DenseRows`; local layers use `BandRows`, whose scores and
softmax only touch the keys a query's window (or its own image) can reach.

Each product is laid out as eager lays it out, so every float sum runs in eager's order
and the logits equal eager's bit for bit (on one machine, with one BLAS): per query head
(keys and values repeated, a view when there is one kv head), at least `MIN_ROWS` query
rows, and pattern @ v over all T keys. A score q·k sums over the head dimension only, so
computing fewer keys changes nothing; a softmax row comes out the same without its masked
entries (their exp is exactly 0). pattern @ v sums over keys, and BLAS blocks that sum by
its length: the zeros a band or a row block leaves out are put back, so the sum is as long
as eager's. That costs S·T multiply-adds per head where a band needs S·window.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from gemma3_lab.model.banded import BandedPattern, BlockRows, skew

CHUNK_BYTES = 16 * 2**20  # float32 scores of one chunk of query rows (prompts up to ~1k: one chunk)
MIN_ROWS = 16  # BLAS multiplies fewer rows with small-matrix kernels, which sum in another order


def row_spans(S: int, rows: int) -> list[tuple[int, int]]:
    """Chunks of `rows` query rows (at least MIN_ROWS) over 0..S-1. A short last chunk joins
    the one before: a product that thin would not round as eager's whole-prompt one does."""
    rows = max(rows, MIN_ROWS)
    spans = [(a, min(a + rows, S)) for a in range(0, S, rows)]
    if len(spans) > 1 and spans[-1][1] - spans[-1][0] < min(rows, MIN_ROWS):
        spans[-2:] = [(spans[-2][0], S)]
    return spans


def repeat_kv(x: Tensor, rep: int) -> Tensor:
    """(B, K, T, H) -> (B, K*rep, T, H): each query head's own keys or values, as eager
    builds them (expand, then reshape: a view for one kv head, a copy otherwise)."""
    B, K, T, H = x.shape
    return x if rep == 1 else x[:, :, None].expand(B, K, rep, T, H).reshape(B, K * rep, T, H)


def _additive(mask: Tensor, dtype: torch.dtype) -> Tensor:
    """0 where allowed, finfo.min where not: added (not filled) so scores match eager bit for bit."""
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, torch.finfo(dtype).min)


def grouped_matmul(x: Tensor, y: Tensor) -> Tensor:
    """(B, N, C, X) @ (B, K, X, Y) -> (B, N, C, Y) for N query heads over K kv heads: kv head j
    serves query heads j*rep .. j*rep+rep-1, so each group is one matmul and keys/values are
    never repeated in memory. The fast path's decode step uses it for q·kᵀ (y = kᵀ) and
    pattern·v (y = v); the explicit path repeats keys and values instead, to round as eager."""
    B, N, C, X = x.shape
    K = y.shape[1]
    if N == K:
        return torch.matmul(x, y)
    return torch.matmul(x.reshape(B, K, (N // K) * C, X), y).view(B, N, C, -1)


def _rows(x, a: int, b: int) -> Tensor:
    """Query rows a..b-1 of a pattern or scores, as stored (a view one can write into)."""
    if isinstance(x, BandedPattern):
        return x.band[:, :, a:b]
    if isinstance(x, BlockRows):
        return x.rows(a, b)
    return x[:, :, a:b]


class DenseRows:
    """Each chunk of query rows against the keys it can reach: all T for a replaced mask, else
    up to the chunk's last query (or its image's end), so a causal pattern keeps ~T²/2."""

    def __init__(self, q: Tensor, k: Tensor, v: Tensor, plan, mask: Tensor | None, scale: float) -> None:
        self.q, self.k, self.plan, self.mask, self.scale = q, k, plan, mask, scale
        B, N, S, _ = q.shape
        T = k.shape[2]
        self.kr, self.vr = repeat_kv(k, N // k.shape[1]), repeat_kv(v, N // k.shape[1])  # (B, N, T, H)
        self.chunks = row_spans(S, max(1, CHUNK_BYTES // (B * N * T * 4)))
        self.keys = {c: T if mask is not None else plan.reach(*c) for c in self.chunks}

    def wrap(self, x: Tensor, fill: float):
        """One chunk's rows as computed: a plain tensor when they reach every key."""
        T = self.k.shape[2]
        return x if x.shape[-1] == T else BlockRows([x], self.plan.q_slots, int(self.plan.kv_slots[0]), T, fill)

    def empty(self, dtype: torch.dtype, fill: float):
        B, N, S, _ = self.q.shape
        T = self.k.shape[2]
        if all(n == T for n in self.keys.values()):
            return torch.empty(B, N, S, T, dtype=dtype, device=self.q.device)
        blocks = [torch.empty(B, N, b - a, self.keys[(a, b)], dtype=dtype, device=self.q.device) for a, b in self.chunks]
        return BlockRows(blocks, self.plan.q_slots, int(self.plan.kv_slots[0]), T, fill)

    def scores(self, a: int, b: int) -> Tensor:
        keys = self.keys[(a, b)]
        s = torch.matmul(self.q[:, :, a:b], self.kr[:, :, :keys].transpose(2, 3)) * self.scale  # (B, N, C, keys)
        m = self.mask[:, :, a:b] if self.mask is not None else self.plan.rows(a, b, keys)
        return s.add_(_additive(m, s.dtype))

    def apply(self, p: Tensor, a: int, b: int) -> Tensor:
        # the keys a block left out are zeros of the full row: the sum runs over all T
        T = self.kr.shape[2]
        p = p if p.shape[-1] == T else F.pad(p, (0, T - p.shape[-1]))
        return torch.matmul(p, self.vr)  # (B, N, C, H)


class BandRows:
    """Each query row against the `width` keys from `back` slots before it to the end of its
    image: column j of row i is key slot q_i - back + j."""

    def __init__(self, q: Tensor, k: Tensor, v: Tensor, plan, scale: float) -> None:
        self.q, self.plan, self.scale = q, plan, scale
        self.back, fwd = plan.band_extent()
        self.width = self.back + 1 + fwd
        # padded key index of slot s is s - k0 + back, so row a's band starts at q_a - k0
        B, N, S, _ = q.shape
        self.kp = repeat_kv(F.pad(k, (0, 0, self.back, fwd)), N // k.shape[1])  # (B, N, back + T + fwd, H)
        self.vr = repeat_kv(v, N // k.shape[1])  # (B, N, T, H)
        self.k0, self.kv_len = int(plan.kv_slots[0]), k.shape[2]
        self.shape = (B, N, S, self.width)
        # a chunk of C rows multiplies C + width - 1 keys: half a window keeps that waste at 1.5x
        self.chunks = row_spans(S, max(16, (plan.window or self.width) // 2))
        # pattern @ v takes full rows of T keys: as many rows at a time as fit in a chunk
        self.pv_rows = max(1, CHUNK_BYTES // (B * N * (self.kv_len + self.width) * 4))

    def _keys(self, a: int, b: int) -> slice:
        start = int(self.plan.q_slots[a]) - self.k0
        return slice(start, start + (b - a) + self.width - 1)

    def wrap(self, x: Tensor, fill: float) -> BandedPattern:
        return BandedPattern(x, self.plan.q_slots, self.back, self.k0, self.kv_len, fill)

    def empty(self, dtype: torch.dtype, fill: float) -> BandedPattern:
        return self.wrap(torch.empty(self.shape, dtype=dtype, device=self.q.device), fill)

    def scores(self, a: int, b: int) -> Tensor:
        s = torch.matmul(self.q[:, :, a:b], self.kp[:, :, self._keys(a, b)].transpose(2, 3)) * self.scale
        s = skew(s, self.width)  # (B, N, C, width), a view
        return s + _additive(self.plan.band_rows(a, b, self.back, self.width), s.dtype)

    def apply(self, p: Tensor, a: int, b: int) -> Tensor:
        spans = row_spans(b - a, self.pv_rows)
        return _cat([torch.matmul(self._full_rows(p[:, :, i:j], a + i), self.vr) for i, j in spans])  # (B, N, C, H)

    def _full_rows(self, band: Tensor, a: int) -> Tensor:
        """(B, N, C, width) band rows from query row a on -> (B, N, C, T): each row's band at
        its keys, zeros elsewhere (band entries for keys outside the cache are dropped)."""
        B, N, C, W = band.shape
        L = self.kv_len + W - 1  # a row in padded key coordinates (back + T + fwd)
        rows = band.new_zeros(B, N, C, L)
        start = self._keys(a, a + 1).start  # row r's band starts at padded key start + r
        rows.as_strided((B, N, C, W), (N * C * L, C * L, L + 1, 1), start).copy_(band)
        return rows[..., self.back : self.back + self.kv_len].contiguous()


def explicit_attention(q, k, v, plan, mask, scale, hook_scores, hook_pattern, store_dtype=None) -> Tensor:
    """(B, N, S, H) attention output from q (B, N, S, H) and k, v (B, K, T, H).

    `mask` is the dense mask when `hook_mask` is hooked (a hook may have replaced it), else None. Scores and
    pattern are built only when their hook point is hooked, in `store_dtype` if given: the
    output is then still computed from full-precision rows, unless a hook returns a new tensor.
    """
    if mask is not None and mask is plan.dense:  # hooked but left as it was: rows come from the plan
        mask = None
    banded = plan.window is not None and mask is None
    geo = BandRows(q, k, v, plan, scale) if banded else DenseRows(q, k, v, plan, mask, scale)
    dt = q.dtype
    sd = store_dtype or dt
    S = q.shape[2]
    chunks = geo.chunks
    whole = len(chunks) == 1 and sd == dt  # one chunk in the model dtype: hand over as computed, no copy
    min_fill = float(torch.tensor(torch.finfo(dt).min, dtype=dt).to(sd))  # as stored

    src = None  # the scores to take the softmax of, when a hook has seen (or replaced) them
    if hook_scores.active:
        if whole:
            full = geo.wrap(geo.scores(0, S), min_fill)
        else:
            full = geo.empty(sd, min_fill)
            for a, b in chunks:
                _rows(full, a, b).copy_(geo.scores(a, b))
        seen = hook_scores(full)
        if seen is not full or sd == dt:
            src = seen
            if isinstance(seen, Tensor) and not isinstance(full, Tensor):  # a hook gave dense scores back
                geo = DenseRows(q, k, v, plan, plan.dense if mask is None else mask, scale)
                chunks = geo.chunks

    def rows(a: int, b: int) -> Tensor:
        s = _rows(src, a, b).to(dt) if src is not None else geo.scores(a, b)
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
            _rows(pat, a, b).copy_(p)
            if sd != dt:  # the stored copy is rounded: take the output from the exact rows
                zs.append(geo.apply(p, a, b))
        seen = hook_pattern(pat)
        if seen is pat and sd != dt:
            return _cat(zs)
    # the pattern as the hook left it (edited in place, or replaced) gives the output
    if isinstance(seen, BandedPattern) != isinstance(geo, BandRows):
        geo = BandRows(q, k, v, plan, scale) if isinstance(seen, BandedPattern) else DenseRows(q, k, v, plan, None, scale)
    return _cat([geo.apply(_rows(seen, a, b).to(dt), a, b) for a, b in chunks])


def _cat(zs: list[Tensor]) -> Tensor:
    return zs[0] if len(zs) == 1 else torch.cat(zs, dim=2)
