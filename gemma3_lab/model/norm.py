"""Gemma's RMSNorm: computed in float32 with the (1 + w) scale, cast back once (docs/gemma3.md §2.2)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gemma3_lab.model import kernels
from gemma3_lab.model.hook_point import HookPoint


def fused_rms_norm(x: Tensor, gain: Tensor, eps: float) -> Tensor:
    """`RMSNorm.forward`'s arithmetic in torch's one fused kernel, for the decode steps: x in
    float32 over its last dim, times `gain` = (1 + w) in float32, one cast back."""
    return F.rms_norm(x.float(), x.shape[-1:], gain, eps).type_as(x)


def decode_gain(norm: "RMSNorm") -> Tensor:
    """(1 + w) in float32, for the decode steps' fused norms: made once and kept until w
    changes (a new tensor or an edit in place)."""
    return kernels.packed(norm, norm.weight, lambda w: 1.0 + w.detach().float())


class RMSNorm(nn.Module):
    """y = x / rms(x) * (1 + w). The stored weight is the offset w, initialised to zero.

    Unlike Llama, the multiply by (1 + w) happens in float32 before the single cast back,
    which matters at bfloat16.
    """

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(dim))
        self.hook_in = HookPoint()  # (..., dim) the input, as it arrives
        self.hook_scale = HookPoint()  # (..., 1) the 1/rms factor, float32
        self.hook_normalized = HookPoint()  # (..., dim) the output

    def forward(self, x: Tensor) -> Tensor:
        xf = self.hook_in(x).float()
        scale = self.hook_scale(torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps))
        y = (xf * scale) * (1.0 + self.weight.float())
        return self.hook_normalized(y.type_as(x))
