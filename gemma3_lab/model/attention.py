"""Gemma 3 grouped-query attention with q/k norm, per-layer RoPE and two equal paths.

The fast path calls SDPA; the explicit path computes scores and the softmax pattern
so they can be hooked. It is taken whenever `hook_attn_scores` or `hook_pattern` is in
use (or `explicit` is set), and a test keeps both paths in agreement (STYLE 9).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gemma3_lab.config import TextConfig
from gemma3_lab.model.banded import skew
from gemma3_lab.model.explicit import explicit_attention, grouped_matmul
from gemma3_lab.model.hook_point import HookPoint
from gemma3_lab.model.kernels import Projection
from gemma3_lab.model.masks import layer_mask
from gemma3_lab.model.norm import RMSNorm
from gemma3_lab.model.rope import apply_rope


@dataclass
class MaskPlan:
    """One layer type's mask for one forward, built lazily: SDPA rarely needs it dense."""

    q_slots: Tensor  # (S,)
    kv_slots: Tensor  # (T,)
    window: int | None
    block_ids: Tensor | None = None  # (B, L) over all slots
    key_valid: Tensor | None = None  # (B, L) over all slots
    _sdpa: tuple | None = field(default=None, repr=False)

    @cached_property
    def dense(self) -> Tensor:
        """(B|1, 1, S, T) bool, True = may attend."""
        return layer_mask(self.q_slots, self.kv_slots, self.window, self.block_ids, self.key_valid)

    def sdpa_args(self) -> tuple[Tensor | None, bool]:
        """(attn_mask, is_causal) for SDPA, skipping the mask when a kernel flag says the same."""
        if self._sdpa is None:
            self._sdpa = self._plan_sdpa()
        return self._sdpa

    def _plan_sdpa(self) -> tuple[Tensor | None, bool]:
        S, T = len(self.q_slots), len(self.kv_slots)
        plain = self.block_ids is None and self.key_valid is None
        in_window = self.window is None or T <= self.window
        if plain and in_window and S == T and int(self.q_slots[0]) == int(self.kv_slots[0]):
            return None, True
        if plain and in_window and S == 1:
            return None, False  # a decode step sees every cached key
        return sdpa_safe(self.dense), False

    # the explicit path asks for rows of the mask, so a long prompt never needs it whole
    def rows(self, a: int, b: int, keys: int | None = None) -> Tensor:
        """(B|1, 1, b-a, keys) bool: the mask of query rows a..b-1 against the first `keys` keys."""
        return layer_mask(self.q_slots[a:b], self.kv_slots[:keys], self.window, self.block_ids, self.key_valid)

    def reach(self, a: int, b: int) -> int:
        """How many keys (from the first) query rows a..b-1 can see at most: up to the last
        row's own slot, or further to the end of its image (docs/gemma3.md §3.3)."""
        q0, q1 = int(self.q_slots[a]), int(self.q_slots[b - 1])
        k0 = int(self.kv_slots[0])
        return min(len(self.kv_slots), q1 - k0 + 1 + _image_reach(self.block_ids, q0, q1))

    def band_extent(self) -> tuple[int, int]:
        """(back, fwd): how many slots before and after itself any query of a local layer can see."""
        q0, q1 = int(self.q_slots[0]), int(self.q_slots[-1])
        k0, k1 = int(self.kv_slots[0]), int(self.kv_slots[-1])
        # forward only inside an image: later soft tokens of the own image (docs/gemma3.md §3.3)
        return max(min(self.window - 1, q1 - k0), 0), min(_image_reach(self.block_ids, q0, q1), max(k1 - q0, 0))

    def band_rows(self, a: int, b: int, back: int, width: int) -> Tensor:
        """(B|1, 1, b-a, width) bool: rows a..b-1 in band layout, column j = key slot q - back + j."""
        qs = self.q_slots[a:b]
        lo, L = int(qs[0]) - back, (b - a) + width - 1  # the keys the chunk's bands span
        k0 = int(self.kv_slots[0])
        i0, i1 = max(lo, k0), min(lo + L, k0 + len(self.kv_slots))
        m = layer_mask(qs, torch.arange(i0, i1, device=qs.device), self.window, self.block_ids, self.key_valid)
        m = F.pad(m, (i0 - lo, lo + L - i1), value=False)  # keys outside the cache: never
        return skew(m, width)


def _image_reach(block_ids: Tensor | None, q0: int, q1: int) -> int:
    """Largest distance from a query slot in q0..q1 to the last soft token of its image."""
    if block_ids is None:
        return 0
    reach = 0
    for b in range(block_ids.shape[0]):
        for bid in block_ids[b, q0 : q1 + 1].unique().tolist():
            if bid >= 0:
                slots = (block_ids[b] == bid).nonzero()
                reach = max(reach, int(slots.max()) - max(int(slots.min()), q0))
    return reach


def sdpa_safe(mask: Tensor) -> Tensor:
    """Unmask fully masked rows (padding queries) so SDPA gives no NaN.

    Their outputs are meaningless either way; transformers does the same for SDPA.
    """
    return mask | ~mask.any(dim=-1, keepdim=True)


class Attention(nn.Module):
    def __init__(self, cfg: TextConfig) -> None:
        super().__init__()
        D, N, K, H = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.n_heads, self.n_kv, self.head_dim, self.scale = N, K, H, cfg.attn_scale
        self.q_proj = Projection(D, N * H)
        self.k_proj = Projection(D, K * H)
        self.v_proj = Projection(D, K * H)
        self.o_proj = Projection(N * H, D)
        self.q_norm = RMSNorm(H, cfg.rms_norm_eps)
        self.k_norm = RMSNorm(H, cfg.rms_norm_eps)
        self.explicit = False  # force the explicit-softmax path
        self.store_dtype: torch.dtype | None = None  # hooked scores/patterns built in this dtype
        self.hook_q = HookPoint()  # (B, S, N, H) before q_norm
        self.hook_k = HookPoint()  # (B, S, K, H)
        self.hook_v = HookPoint()  # (B, S, K, H)
        self.hook_rot_q = HookPoint()  # (B, S, N, H) after q_norm and RoPE
        self.hook_rot_k = HookPoint()  # (B, S, K, H)
        self.hook_mask = HookPoint()  # (B|1, 1, S, T) bool, the exact mask used
        self.hook_attn_scores = HookPoint()  # (B, N, S, T) scaled scores, masked = finfo.min
        self.hook_pattern = HookPoint()  # (B, N, S, T) softmax
        self.hook_z = HookPoint()  # (B, S, N, H) per-head output before o_proj
        self.hook_out = HookPoint()  # (B, S, D) o_proj output, before post_attention_norm

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, plan: MaskPlan, cache=None) -> Tensor:
        B, S, _ = x.shape
        N, K, H = self.n_heads, self.n_kv, self.head_dim
        q = self.hook_q(self.q_proj(x).view(B, S, N, H))  # (B, S, N, H)
        k = self.hook_k(self.k_proj(x).view(B, S, K, H))  # (B, S, K, H)
        v = self.hook_v(self.v_proj(x).view(B, S, K, H))
        # q/k norm comes before RoPE; v is never normed (docs/gemma3.md §2.3)
        q = self.hook_rot_q(apply_rope(self.q_norm(q), cos, sin))
        k = self.hook_rot_k(apply_rope(self.k_norm(k), cos, sin))
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, N|K, S, H)
        if cache is not None:
            k, v = cache.update(k, v)  # (B, K, T, H)
        mask = self.hook_mask(plan.dense) if self.hook_mask.active else None
        if self.explicit or self.hook_pattern.active or self.hook_attn_scores.active:
            z = explicit_attention(
                q, k, v, plan, mask, self.scale, self.hook_attn_scores, self.hook_pattern, self.store_dtype
            )
        else:
            attn_mask, is_causal = plan.sdpa_args() if mask is None else (sdpa_safe(mask), False)
            if S == 1:
                z = self._one_query(q, k, v, attn_mask)
            else:
                z = F.scaled_dot_product_attention(
                    q, k, v, attn_mask=attn_mask, is_causal=is_causal, scale=self.scale, enable_gqa=K != N
                )
        z = self.hook_z(z.transpose(1, 2))  # (B, S, N, H)
        return self.hook_out(self.o_proj(z.reshape(B, S, N * H)))

    def _one_query(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> Tensor:
        """A decode step: CPU SDPA kernels are tuned for long blocks and cost ~10x more for
        one query than these three small matmuls. Query heads are grouped per kv head."""
        scores = grouped_matmul(q, k.transpose(2, 3)) * self.scale  # (B, N, 1, T)
        if mask is not None:  # (B|1, 1, 1, T): same for every head
            scores = scores.masked_fill(~mask, float("-inf"))
        pattern = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
        return grouped_matmul(pattern, v)  # (B, N, 1, H)


ATTENTION_PATHS = ("sdpa", "explicit")


def use_attention_path(blocks, path: str) -> None:
    """"sdpa" (fast; explicit only where a pattern is hooked) or "explicit" for every block's
    attention (text and vision alike)."""
    if path not in ATTENTION_PATHS:
        raise ValueError(f"attention path must be 'sdpa' or 'explicit', not {path!r}")
    for b in blocks:
        b.attn.explicit = path == "explicit"
