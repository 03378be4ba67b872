"""Attention facts for the mask notebook: where a word sits in a prompt, how much attention goes
to chosen keys or beyond the sliding window, and hooks that narrow chosen layers to a window."""

from __future__ import annotations

import torch
from torch import Tensor

from gemma3_lab.model.masks import sliding_window


def find_tokens(model, ids, text: str) -> list[int]:
    """Positions of the first occurrence of `text`'s tokens (as they appear mid-sentence, after
    a space when `text` starts with one) inside the id list `ids`."""
    ids = ids.tolist() if isinstance(ids, Tensor) else list(ids)
    sub = model.tokenizer.encode(text, add_bos=False)
    for i in range(len(ids) - len(sub) + 1):
        if ids[i : i + len(sub)] == sub:
            return list(range(i, i + len(sub)))
    raise ValueError(f"{text!r} (tokens {sub}) does not occur in the given ids")


def attention_mass(pattern, queries, keys) -> Tensor:
    """(N,) attention each head puts on the key slots `keys`, averaged over the query slots
    `queries`, from a (B, N, S, T) pattern (batch row 0); banded patterns are expanded."""
    p = pattern.dense() if hasattr(pattern, "dense") else pattern
    q = torch.as_tensor(queries).reshape(-1)
    kk = torch.as_tensor(keys).reshape(-1)
    return p[0][:, q][:, :, kk].float().sum(-1).mean(-1)


def window_hooks(model, layers, window: int | None = None) -> list[tuple[str, object]]:
    """Hooks for `model.hooks(...)` that narrow the masks of `layers` to a sliding window
    (default: the model's own), e.g. to make the global layers local for one uncached forward.

    The hook replaces what `hook_mask` passes on, and the model attends with the mask it gets
    back; the window is the same pure function the local layers use (`masks.sliding_window`).
    """
    w = window or model.config.text.sliding_window

    def narrow(mask: Tensor, hook) -> Tensor:  # (B|1, 1, S, T): slots 0..T-1 in a full forward
        S, T = mask.shape[-2:]
        return mask & sliding_window(torch.arange(T - S, T, device=mask.device), torch.arange(T, device=mask.device), w)

    return [(f"blocks.{i}.attn.hook_mask", narrow) for i in layers]


def mass_beyond_window(pattern, window: int, first_key: int = 0) -> Tensor:
    """(N,) for a global layer's (B, N, S, T) pattern: the attention mass each head puts on keys
    at least `window` slots back — keys a sliding-window layer could not see — averaged over
    the queries that have such keys (slots >= window). Keys before slot `first_key` are left
    out (1 leaves out `<bos>`, where idle heads park their attention). NaN when the prompt is
    not that long."""
    p = pattern.dense() if hasattr(pattern, "dense") else pattern
    S, T = p.shape[-2:]
    q = torch.arange(S)[:, None]
    k = torch.arange(T)[None, :]
    far = (k <= q - window) & (k >= first_key)  # (S, T)
    rows = (k <= q - window).any(-1)
    if not bool(rows.any()):
        return torch.full((p.shape[1],), float("nan"))
    return (p[0].float() * far).sum(-1)[:, rows].mean(-1)
