"""Key/value cache for incremental decoding. Local layers keep only their window.

Keys are tracked by cache slot (absolute index in the padded sequence), so the same mask
functions serve a prefill and a decode step. Mirrors transformers' DynamicSlidingWindowLayer:
a local layer stores its last W-1 keys, and one step sees those plus the new ones (docs/gemma3.md §9).
"""

from __future__ import annotations

from collections import Counter

import torch
from torch import Tensor

from gemma3_lab.config import AttentionType, TextConfig


class LayerCache:
    """One layer's keys/values in a preallocated buffer: a step writes its keys in place
    instead of concatenating the whole cache again (O(new) per step, not O(length)).

    The buffer grows by doubling (a global layer); a local layer slides its last `keep`
    keys back to the front when its buffer is full, once every `keep` or so steps.
    """

    def __init__(self, keep: int | None) -> None:
        self.keep = keep  # None: keep everything (global layer)
        self._k: Tensor | None = None  # (B, K, capacity, H)
        self._v: Tensor | None = None
        self._start = 0  # first kept slot in the buffer
        self._end = 0  # one past the last written slot

    @property
    def k(self) -> Tensor | None:
        """(B, K, L, H) the kept keys, oldest first (a view of the buffer)."""
        return None if self._k is None else self._k[:, :, self._start : self._end]

    @property
    def v(self) -> Tensor | None:
        return None if self._v is None else self._v[:, :, self._start : self._end]

    def update(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Append this step's keys/values; return everything this step attends over."""
        S = k.shape[2]
        self._make_room(k, S)
        a, b = self._start, self._end + S
        self._k[:, :, self._end : b] = k
        self._v[:, :, self._end : b] = v
        self._end = b
        if self.keep is not None:
            self._start = max(a, b - self.keep)
        return self._k[:, :, a:b], self._v[:, :, a:b]

    def copy(self) -> "LayerCache":
        """An independent cache holding the same kept keys and values."""
        new = LayerCache(self.keep)
        if self._k is not None:
            new._allocate(self.k, self._end - self._start, (self.k, self.v))
        return new

    def repeat_rows(self, n: int) -> None:
        """One row's keys become n identical rows, each in its own part of a new buffer."""
        if self._k is not None:
            kept = (self.k.expand(n, -1, -1, -1), self.v.expand(n, -1, -1, -1))
            self._allocate(kept[0], kept[0].shape[2], kept)

    def _make_room(self, k: Tensor, S: int) -> None:
        if self._k is None:
            self._allocate(k, S, None)
        # full (one slot always spare: the kept keys are then never the whole buffer, which the
        # compiled decode step's graph is guarded on): a bigger buffer, or the kept keys moved up front
        elif self._end + S >= self._k.shape[2]:
            kept = (self._k[:, :, self._start : self._end], self._v[:, :, self._start : self._end])
            self._allocate(k, self._end - self._start + S, kept)

    def _allocate(self, like: Tensor, need: int, old: tuple[Tensor, Tensor] | None) -> None:
        """A new buffer with room for `need` slots and as many again; `old` copied to its front."""
        B, K, _, H = like.shape
        cap = max(2 * need, 64 if self.keep is None else 2 * self.keep)
        self._k = like.new_empty(B, K, cap, H)
        self._v = like.new_empty(B, K, cap, H)
        n = 0 if old is None else old[0].shape[2]
        if old is not None:
            self._k[:, :, :n], self._v[:, :, :n] = old
        self._start, self._end = 0, n


class KVCache:
    """Per-layer caches plus what the masks and RoPE need about the slots already filled."""

    def __init__(self, config: TextConfig) -> None:
        self.config = config
        self.layers = [
            LayerCache(config.sliding_window - 1 if t is AttentionType.LOCAL_SLIDING else None)
            for t in config.layer_types
        ]
        self.length = 0  # slots filled so far
        self.key_valid: Tensor | None = None  # (B, length) False on padding, None if none
        self.block_ids: Tensor | None = None  # (B, length) image block of each slot, or None
        self.next_position: Tensor | None = None  # (B,) RoPE position of the next token
        # what the lean and compiled decode steps list at a generation's first step and reuse
        # (its modules do not change under it): hook dicts to watch, weights' owners
        self.plan: dict[str, object] = {}
        self.paths: Counter[str] = Counter()  # decode steps taken, by path: "native" | "compiled" | "lean" | "plain"

    def kv_slots(self, layer_type: AttentionType, new: int) -> Tensor:
        """Slots a layer of this type attends over once `new` tokens are appended."""
        start = 0
        if layer_type is AttentionType.LOCAL_SLIDING:
            start = max(0, self.length - (self.config.sliding_window - 1))
        return torch.arange(start, self.length + new)

    def advance(self, new: int, key_valid: Tensor | None, block_ids: Tensor | None, positions: Tensor) -> None:
        """Record `new` appended slots. `key_valid`/`block_ids` cover every slot from 0."""
        self.length += new
        self.key_valid, self.block_ids = key_valid, block_ids
        self.next_position = positions[:, -1] + 1

    def copy(self) -> "KVCache":
        """An independent cache at the same point (what comes after can run twice from here)."""
        new = KVCache(self.config)
        new.layers = [c.copy() for c in self.layers]
        new.length, new.key_valid, new.block_ids, new.next_position = (
            self.length, self.key_valid, self.block_ids, self.next_position)
        return new

    def repeat_rows(self, n: int) -> None:
        """A one-row cache becomes n identical rows (one prompt forward shared by n generations)."""
        for c in self.layers:
            c.repeat_rows(n)
        self.key_valid = None if self.key_valid is None else self.key_valid.expand(n, -1)
        self.block_ids = None if self.block_ids is None else self.block_ids.expand(n, -1)
        self.next_position = None if self.next_position is None else self.next_position.expand(n)
