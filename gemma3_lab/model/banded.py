"""Attention patterns (and scores) kept without their always-empty part, so capturing them
for a long prompt costs far less than T².

* `BandedPattern` (local layers): each query keeps only the keys its sliding window (and its
  own image) can reach: T × window.
* `BlockRows` (global layers, prompts longer than one chunk of query rows): blocks of rows,
  each with the keys up to its last query (or its image's end): the causal triangle, ~T²/2.

`.dense()` rebuilds the full (B, N, S, T) tensor exactly: every entry left out is the value
the dense explicit path gives there (0 in a pattern, finfo.min in scores). `.to_dense()` is
the same call, so `p.to_dense()` works for these and for plain tensors alike.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import Tensor


def skew(x: Tensor, width: int) -> Tensor:
    """(..., C, C+width-1) contiguous -> (..., C, width) view with out[r, j] = x[r, r + j]."""
    *lead, C, L = x.shape
    assert x.is_contiguous() and L == C + width - 1, (x.shape, width)
    return x.as_strided((*lead, C, width), (*x.stride()[:-2], L + 1, 1))


class PatternView:
    """What both compact layouts offer: the dense view, its shape, selection and moves."""

    q_slots: Tensor  # (S,) long: the absolute slot of each query row
    kv_start: int
    kv_len: int
    fill: float

    def tensors(self) -> list[Tensor]:
        raise NotImplementedError

    def _map(self, fn) -> "PatternView":
        raise NotImplementedError

    @property
    def shape(self) -> torch.Size:
        """The shape of the dense view."""
        B, N = self.tensors()[0].shape[:2]
        return torch.Size((B, N, len(self.q_slots), self.kv_len))

    @property
    def dtype(self) -> torch.dtype:
        return self.tensors()[0].dtype

    @property
    def device(self) -> torch.device:
        return self.tensors()[0].device

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())

    def to_dense(self) -> Tensor:
        return self.dense()

    def to(self, device=None, dtype=None) -> "PatternView":
        fill = self.fill
        if dtype is not None:  # rounded as the entries are (float32's finfo.min is -inf in bfloat16)
            fill = float(torch.tensor(fill, dtype=self.dtype).to(dtype))
        return replace(self._map(lambda t: t.to(device=device, dtype=dtype)), q_slots=self.q_slots.to(device), fill=fill)

    def detach(self) -> "PatternView":
        return self._map(Tensor.detach)

    def clone(self) -> "PatternView":
        return self._map(Tensor.clone)


@dataclass
class BandedPattern(PatternView):
    """A (B, N, S, T) pattern (or scores) kept as `band` (B, N, S, width).

    Column j of row i holds key slot `q_slots[i] - back + j`; keys are slots
    `kv_start .. kv_start + kv_len - 1`. Band entries that point outside those keys
    hold `fill`, as do all dense entries outside the band.
    """

    band: Tensor  # (B, N, S, width)
    q_slots: Tensor  # (S,) long: the absolute slot of each query row
    back: int  # keys before the query inside the band (window - 1 at most)
    kv_start: int
    kv_len: int
    fill: float = 0.0  # 0 for a pattern, finfo(dtype).min for scores

    def tensors(self) -> list[Tensor]:
        return [self.band]

    def _map(self, fn) -> "BandedPattern":
        return replace(self, band=fn(self.band))

    @property
    def width(self) -> int:
        return self.band.shape[-1]

    def key_slots(self) -> Tensor:
        """(S, width) absolute key slot of every band entry."""
        return self.q_slots[:, None] - self.back + torch.arange(self.width, device=self.q_slots.device)[None]

    # ------------------------------------------------------------------ views
    def dense(self) -> Tensor:
        """The full (B, N, S, T) tensor, entry for entry what the dense explicit path gives."""
        cols = self.key_slots().to(self.device) - self.kv_start  # (S, width)
        rows, j = ((cols >= 0) & (cols < self.kv_len)).nonzero(as_tuple=True)
        out = torch.full(self.shape, self.fill, dtype=self.dtype, device=self.device)
        out[:, :, rows, cols[rows, j]] = self.band[:, :, rows, j]
        return out

    def select(self, heads=None, rows=None) -> "BandedPattern":
        """Keep some heads (axis 1) and/or query rows (axis 2); keys stay as they are."""
        band, q = self.band, self.q_slots
        if heads is not None:
            band = band[:, heads]
        if rows is not None:
            rows = torch.as_tensor(rows, dtype=torch.long)
            band, q = band[:, :, rows.to(band.device)], q[rows.to(q.device)]
        return replace(self, band=band, q_slots=q)

    def __repr__(self) -> str:
        return (f"BandedPattern(shape={tuple(self.shape)}, band={tuple(self.band.shape)}, back={self.back}, "
                f"dtype={self.dtype})")


@dataclass
class BlockRows(PatternView):
    """A (B, N, S, T) pattern (or scores) kept as consecutive blocks of query rows; block i is
    (B, N, rows_i, keys_i) and holds keys `kv_start .. kv_start + keys_i - 1`, all its rows can
    reach. The keys left out of a block hold `fill`."""

    blocks: list[Tensor]
    q_slots: Tensor
    kv_start: int
    kv_len: int
    fill: float = 0.0

    def tensors(self) -> list[Tensor]:
        return self.blocks

    def _map(self, fn) -> "BlockRows":
        return replace(self, blocks=[fn(b) for b in self.blocks])

    def starts(self) -> list[int]:
        out, a = [], 0
        for b in self.blocks:
            out.append(a)
            a += b.shape[2]
        return out

    def rows(self, a: int, b: int) -> Tensor:
        """Rows a..b-1: the stored block itself (a view) when they are one block, else dense rows."""
        starts = self.starts()
        if a in starts:
            blk = self.blocks[starts.index(a)]
            if blk.shape[2] == b - a:
                return blk
        return self.select(rows=torch.arange(a, b)).dense()

    def dense(self) -> Tensor:
        """The full (B, N, S, T) tensor, entry for entry what the dense explicit path gives."""
        pad = torch.nn.functional.pad
        return torch.cat([pad(b, (0, self.kv_len - b.shape[-1]), value=self.fill) for b in self.blocks], dim=2)

    def select(self, heads=None, rows=None) -> "BlockRows":
        """Keep some heads (axis 1) and/or query rows (axis 2), in the order given."""
        blocks = self.blocks if heads is None else [b[:, heads] for b in self.blocks]
        if rows is None:
            return replace(self, blocks=blocks)
        rows = torch.as_tensor(rows, dtype=torch.long).flatten().cpu()
        starts = torch.tensor(self.starts())
        which = torch.searchsorted(starts, rows, right=True) - 1  # the block of each row
        out = []
        i = 0
        while i < len(rows):  # runs of rows from one block stay one block
            j = i
            while j + 1 < len(rows) and which[j + 1] == which[i]:
                j += 1
            blk = blocks[int(which[i])]
            out.append(blk[:, :, (rows[i : j + 1] - starts[which[i]]).to(blk.device)])
            i = j + 1
        return replace(self, blocks=out, q_slots=self.q_slots[rows.to(self.q_slots.device)])

    def __repr__(self) -> str:
        return f"BlockRows(shape={tuple(self.shape)}, {len(self.blocks)} blocks, {self.nbytes / 2**20:.1f} MiB, dtype={self.dtype})"


def concat_rows(parts: list[BandedPattern], kv_len: int) -> BandedPattern:
    """Stack bands of consecutive forwards (prefill, then decode steps) along the query axis.

    Bands are widened to a common `back`/forward reach; keys become slots 0 .. kv_len-1.
    """
    back = max(p.back for p in parts)
    fwd = max(p.width - 1 - p.back for p in parts)
    bands = []
    for p in parts:
        left, right = back - p.back, fwd - (p.width - 1 - p.back)
        band = p.band
        if left or right:
            band = torch.nn.functional.pad(band, (left, right), value=p.fill)
        # entries for keys the forward did not see (evicted from the cache) are fill already
        bands.append(band)
    q = torch.cat([p.q_slots for p in parts])
    return BandedPattern(torch.cat(bands, dim=2), q, back, 0, kv_len, parts[0].fill)
