"""Rotary position embeddings: one table per layer type (local θ=1e4, global θ=1e6 with
optional linear scaling), half-split rotation as in transformers (docs/gemma3.md §2.4)."""

from __future__ import annotations

import torch
from torch import Tensor

from gemma3_lab.config import RopeConfig


def inv_freq(rope: RopeConfig, head_dim: int) -> Tensor:
    """(H/2,) float32 frequencies on the CPU. Linear scaling divides them, i.e. positions / factor.
    (CPU even inside a meta-device build: meta arithmetic would import torch._dynamo, 2 s.)"""
    f = 1.0 / (rope.theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64, device="cpu").float() / head_dim))
    return f / rope.factor if rope.scaling == "linear" else f


def rope_tables(position_ids: Tensor, freqs: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """cos, sin of shape (B, S, H) for `position_ids` (B, S).

    The angle is computed elementwise in float32 and only then cast to the model dtype,
    so a bfloat16 model sees bfloat16-rounded tables exactly like transformers.
    """
    angles = position_ids[..., None].float() * freqs.float()  # (B, S, H/2)
    emb = torch.cat((angles, angles), dim=-1)  # (B, S, H)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def rotate_half(x: Tensor) -> Tensor:
    h = x.shape[-1] // 2
    return torch.cat((-x[..., h:], x[..., :h]), dim=-1)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x (B, S, N, H) with cos/sin (B, S, H), broadcast over heads."""
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    return x * cos + rotate_half(x) * sin
