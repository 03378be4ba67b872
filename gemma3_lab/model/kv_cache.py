"""Key/value cache for incremental decoding. Local layers keep only their window.

Keys are tracked by cache slot (absolute index in the padded sequence), so the same mask
functions serve a prefill and a decode step. Mirrors transformers' DynamicSlidingWindowLayer:
a local layer stores its last W-1 keys, and one step sees those plus the new ones (docs/gemma3.md §9).
"""

from __future__ import annotations

import torch
from torch import Tensor

from gemma3_lab.config import AttentionType, TextConfig


class LayerCache:
    def __init__(self, keep: int | None) -> None:
        self.keep = keep  # None: keep everything (global layer)
        self.k: Tensor | None = None  # (B, K, L, H)
        self.v: Tensor | None = None

    def update(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Append this step's keys/values; return everything this step attends over."""
        if self.k is not None:
            k = torch.cat((self.k, k), dim=2)
            v = torch.cat((self.v, v), dim=2)
        if self.keep is None:
            self.k, self.v = k, v
        else:
            self.k, self.v = k[:, :, -self.keep :], v[:, :, -self.keep :]
        return k, v


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

    def repeat_rows(self, n: int) -> None:
        """A one-row cache becomes n identical rows (one prompt forward shared by n generations)."""
        for c in self.layers:
            if c.k is not None:
                c.k, c.v = c.k.expand(n, -1, -1, -1), c.v.expand(n, -1, -1, -1)
        self.key_valid = None if self.key_valid is None else self.key_valid.expand(n, -1)
        self.block_ids = None if self.block_ids is None else self.block_ids.expand(n, -1)
        self.next_position = None if self.next_position is None else self.next_position.expand(n)
