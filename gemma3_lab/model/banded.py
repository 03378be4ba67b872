"""Local-layer attention patterns stored as a band: each query keeps only the keys its
sliding window (and its own image) can reach, so memory grows as T × window, not T².

`BandedPattern.dense()` rebuilds the full (B, N, S, T) tensor exactly: every entry outside
the band is the value the dense explicit path gives there (0 in a pattern, finfo.min in
scores). `.to_dense()` is the same call, so `p.to_dense()` works for bands and tensors alike.
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


def unskew(band: Tensor) -> Tensor:
    """(..., C, width) -> (..., C, C+width-1) zeros with row r's band placed at columns r..r+width-1."""
    *lead, C, W = band.shape
    out = band.new_zeros(*lead, C, C + W - 1)
    skew(out, W).copy_(band)
    return out


@dataclass
class BandedPattern:
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

    # ------------------------------------------------------------------ facts
    @property
    def shape(self) -> torch.Size:
        """The shape of the dense view."""
        B, N, S, _ = self.band.shape
        return torch.Size((B, N, S, self.kv_len))

    @property
    def width(self) -> int:
        return self.band.shape[-1]

    @property
    def dtype(self) -> torch.dtype:
        return self.band.dtype

    @property
    def device(self) -> torch.device:
        return self.band.device

    @property
    def nbytes(self) -> int:
        return self.band.numel() * self.band.element_size()

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

    to_dense = dense

    def select(self, heads=None, rows=None) -> "BandedPattern":
        """Keep some heads (axis 1) and/or query rows (axis 2); keys stay as they are."""
        band, q = self.band, self.q_slots
        if heads is not None:
            band = band[:, heads]
        if rows is not None:
            band, q = band[:, :, rows], q[rows]
        return replace(self, band=band, q_slots=q)

    def to(self, device=None, dtype=None) -> "BandedPattern":
        fill = self.fill
        if dtype is not None:  # rounded as the band's entries are (float32's finfo.min is -inf in bfloat16)
            fill = float(torch.tensor(fill, dtype=self.dtype).to(dtype))
        return replace(self, band=self.band.to(device=device, dtype=dtype), q_slots=self.q_slots.to(device), fill=fill)

    def detach(self) -> "BandedPattern":
        return replace(self, band=self.band.detach())

    def clone(self) -> "BandedPattern":
        return replace(self, band=self.band.clone())

    def __repr__(self) -> str:
        return (f"BandedPattern(shape={tuple(self.shape)}, band={tuple(self.band.shape)}, back={self.back}, "
                f"dtype={self.dtype})")


def to_dense(x) -> Tensor:
    """A dense tensor from a tensor or a BandedPattern."""
    return x.dense() if isinstance(x, BandedPattern) else x


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
