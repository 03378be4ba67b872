"""Activations recorded during generation, one piece per forward (the prefill, then each
decode step), stitched into one tensor over absolute positions.

Each piece is tagged with the cache slots of its queries (from `hook_slots`), so a decode
step's pattern row lands under its own position and its keys under theirs; the stitched
result equals one `run_with_cache` over the final sequence.
"""

from __future__ import annotations

import torch
from torch import Tensor

from gemma3_lab.instrument.activation_cache import Layout, layout
from gemma3_lab.model.banded import BandedPattern, PatternView, concat_rows


class Capture:
    """One hook point over a generation. Iterating gives each forward's raw tensor (prefill
    first); `capture[pos]` the activation at absolute position `pos`; `.tensor()` all of them
    concatenated along the sequence axis (keys aligned for masks, scores and patterns)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.layout: Layout = layout(name)
        self.pieces: list = []
        self.slots: list[Tensor] = []  # per piece, the absolute slot of each query row
        self._stitched = None

    def add(self, t, slots: Tensor) -> None:
        if self.layout.seq is not None:
            rows = len(t.q_slots) if isinstance(t, PatternView) else t.shape[self.layout.seq]
            slots = slots[-rows:]  # e.g. logits computed for the last position only
        self.pieces.append(t)
        self.slots.append(slots.cpu())
        self._stitched = None

    def continued(self) -> "Capture":
        """A Capture that starts with this one's pieces and takes further ones of its own."""
        new = Capture(self.name)
        new.pieces, new.slots = list(self.pieces), list(self.slots)
        return new

    def __iter__(self):
        return iter(self.pieces)

    @property
    def positions(self) -> Tensor:
        """(S',) the absolute positions covered, in the order of `.tensor()`'s sequence axis."""
        return torch.cat(self.slots)

    def tensor(self):
        """All pieces as one tensor (a BandedPattern for local-layer patterns and scores: `.to_dense()`)."""
        if self._stitched is None:
            self._stitched = self._stitch()
        return self._stitched

    def __getitem__(self, position: int):
        if self.layout.seq is None:
            raise IndexError(f"{self.name} is not per token: use .tensor()")
        hit = (self.positions == position).nonzero()
        if not len(hit):
            raise IndexError(f"position {position} was not computed in this generation ({self.name})")
        i = int(hit[0])
        t = self.tensor()
        if isinstance(t, PatternView):
            return t.select(rows=[i]).dense()[:, :, 0]
        return t.select(self.layout.seq, i)

    def _stitch(self):
        if self.layout.seq is None:
            return self.pieces[0] if len(self.pieces) == 1 else torch.cat(self.pieces)
        if not self.layout.keys:
            return torch.cat(self.pieces, dim=self.layout.seq)
        total = int(self.positions.max()) + 1
        if all(isinstance(p, BandedPattern) for p in self.pieces):
            return concat_rows(self.pieces, total)
        return torch.cat([_widen(p, s, total, self.name) for p, s in zip(self.pieces, self.slots)], dim=2)

    def __repr__(self) -> str:
        return f"Capture({self.name!r}, {len(self.pieces)} forwards, positions {len(self.positions)})"


def _widen(piece, slots: Tensor, total: int, name: str) -> Tensor:
    """A (B, N, s, T) piece whose keys end at its last query, padded to keys 0 .. total-1."""
    p = piece.to_dense()
    end = int(slots[-1]) + 1
    start = end - p.shape[-1]
    if p.dtype == torch.bool:
        fill = False
    elif name.endswith("hook_attn_scores"):
        fill = torch.finfo(p.dtype).min
    else:
        fill = 0.0
    return torch.nn.functional.pad(p, (start, total - end), value=fill)


def row_captures(store: dict[str, Capture], row: int, fed: int) -> dict[str, Capture]:
    """Batch row `row` of a batched generation's captures, keeping the forwards whose queries
    all sit before slot `fed` (a finished row is fed again while the others go on)."""
    out = {}
    for name, cap in store.items():
        mine = Capture(name)
        for piece, slots in zip(cap.pieces, cap.slots):
            if cap.layout.seq is not None and len(slots) and int(slots[-1]) >= fed:
                continue
            mine.pieces.append(_batch_row(piece, row))
            mine.slots.append(slots)
        out[name] = mine
    return out


def _batch_row(t, row: int):
    """Row `row` of a (B, ...) activation; a piece computed once for every row (B = 1) is shared."""
    if t.shape[0] == 1:
        return t
    if isinstance(t, PatternView):
        return t._map(lambda x: x[row : row + 1])
    return t[row : row + 1]


class SlotTracker:
    """Remembers the slots of the forward in progress; `pair()` is the `hook_slots` hook that
    sets them, which runs before any other hook point of a forward."""

    def __init__(self) -> None:
        self.now: Tensor | None = None

    def pair(self) -> tuple[str, object]:
        def track(t, hook):
            self.now = t.cpu()

        return ("hook_slots", track)

    def rows(self, positions=None) -> tuple[Tensor, Tensor]:
        """(rows of this forward, their absolute positions) for the wanted positions present now."""
        if positions is None:
            return torch.arange(len(self.now)), self.now
        want = torch.as_tensor(list(positions), dtype=torch.long)
        rows, which = (self.now[:, None] == want[None, :]).nonzero(as_tuple=True)
        return rows, want[which]


def capture_hooks(model, names_filter, store: dict[str, Capture]) -> list:
    """(name, fn) pairs recording every forward into `store`; unknown names fail before anything runs."""
    if not names_filter:
        return []
    names = model.select_hook_names(names_filter)
    slots = SlotTracker()

    def save(name):
        def fn(t, hook):
            cap = store.get(name)
            if cap is None:
                cap = store[name] = Capture(name)
            cap.add(t.detach(), slots.now)

        return fn

    return [slots.pair()] + [(n, save(n)) for n in names]
