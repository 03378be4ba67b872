"""Attention masks as pure functions of positions, token types and layer type.

The model and the visualizers call these same functions, so what is drawn is what is used.
True means "query may attend to key". Positions are cache slots (absolute indices in the
padded sequence), not RoPE positions. Rules follow transformers' masking_utils (docs/gemma3.md §3).
"""

from __future__ import annotations

import torch
from torch import Tensor


def causal(q_pos: Tensor, kv_pos: Tensor) -> Tensor:
    """(S, T): key at or before the query."""
    return kv_pos[None, :] <= q_pos[:, None]


def sliding_window(q_pos: Tensor, kv_pos: Tensor, window: int) -> Tensor:
    """(S, T): key inside the last `window` slots up to the query, itself included.

    Only the backward bound `kv > q - window` — causality is a separate rule, so an image
    token can still see later tokens of its own image in a local layer (docs/gemma3.md §3.3).
    """
    return kv_pos[None, :] > q_pos[:, None] - window


def image_block_ids(token_types: Tensor) -> Tensor:
    """(B, L) id of the contiguous run of image tokens each slot belongs to, -1 for text.

    Each maximal run of soft tokens (one image, or one pan-and-scan crop) is one block.
    """
    is_image = token_types == 1
    prev = torch.nn.functional.pad(is_image, (1, 0), value=False)[:, :-1]
    starts = is_image & ~prev
    group = torch.cumsum(starts.long(), dim=1) - 1
    return torch.where(is_image, group, torch.full_like(group, -1))


def same_image(block_ids: Tensor, q_pos: Tensor, kv_pos: Tensor) -> Tensor:
    """(B, S, T): query and key are soft tokens of the same image block."""
    bq = block_ids[:, q_pos][:, :, None]
    bk = block_ids[:, kv_pos][:, None, :]
    return (bq == bk) & (bq >= 0)


def layer_mask(
    q_pos: Tensor,
    kv_pos: Tensor,
    window: int | None = None,
    block_ids: Tensor | None = None,
    key_valid: Tensor | None = None,
) -> Tensor:
    """(B or 1, 1, S, T) boolean mask of one layer.

    global: causal                     (∨ same image)  ∧ key not padding
    local:  (causal (∨ same image)) ∧ kv > q - window   ∧ key not padding
    `block_ids` (B, L) and `key_valid` (B, L) are indexed by slot; L covers every slot
    from 0, so they work for a prefill and for decode steps alike.
    """
    m = causal(q_pos, kv_pos)[None]  # (1, S, T)
    if block_ids is not None:
        m = m | same_image(block_ids, q_pos, kv_pos)
    if window is not None:
        m = m & sliding_window(q_pos, kv_pos, window)[None]
    if key_valid is not None:
        m = m & key_valid[:, kv_pos][:, None, :].bool()
    return m[:, None]  # (B, 1, S, T)


def model_masks(
    windows: list[int | None], seq_len: int, token_types: Tensor | None = None,
    attention_mask: Tensor | None = None,
) -> list[Tensor]:
    """Every layer's mask for a full (uncached) forward of `seq_len` tokens.

    `windows[i]` is layer i's sliding window, None for a global layer. Layers with the same
    window share one tensor. This is what the visualizers draw.
    """
    pos = torch.arange(seq_len)
    blocks = None
    if token_types is not None and bool((token_types == 1).any()):
        blocks = image_block_ids(token_types)
    by_window = {w: layer_mask(pos, pos, w, blocks, attention_mask) for w in set(windows)}
    return [by_window[w] for w in windows]
