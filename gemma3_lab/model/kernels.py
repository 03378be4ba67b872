"""Matmul kernels for decode-sized products (one token, a weight read once), chosen by what
the CPU runs fast; the plain path (`F.linear`) is the reference they are tested against.

bfloat16: torch's `F.linear` with one bfloat16 row reorders the weight on every call and
runs at a fraction of float32's bandwidth; oneDNN on a weight packed once (into its
blocked layout) reads it at about twice float32's speed where the CPU has AVX-512. The
packed copy is made on first use and remade whenever the weight changes (an edit in place
bumps its version), so interventions on weights are always seen. Quantized projections
bring their own packed kernels (`decode_forward`, in gemma3_lab.loading.quantize).
"""

from __future__ import annotations

import os
import weakref
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# module -> ((data_ptr, version, dtype, shape) of the weight it was made from, packed form)
_PACKS: "weakref.WeakKeyDictionary[nn.Module, tuple[tuple, object]]" = weakref.WeakKeyDictionary()
FORCE_PLAIN = "GEMMA3_LAB_PLAIN_KERNELS"  # set to 1: every product takes the plain F.linear


def bf16_native() -> bool:
    """Does this CPU run oneDNN's bfloat16 matmul in hardware (AVX-512 and up)? An AVX2-only
    CPU (or ATEN_CPU_CAPABILITY=avx2) emulates it; there the plain path is used."""
    if os.environ.get(FORCE_PLAIN) == "1" or not torch.backends.mkldnn.is_available():
        return False
    cap = torch.backends.cpu.get_cpu_capability()
    return cap.startswith("AVX512") or cap.startswith("AMX")


def packed(module: nn.Module, weight: Tensor, make: Callable[[Tensor], object]) -> object:
    """`make(weight)`, cached per module until `weight` changes (new tensor or in-place edit)."""
    key = (weight.data_ptr(), weight._version, weight.dtype, tuple(weight.shape))
    hit = _PACKS.get(module)
    if hit is not None and hit[0] == key:
        return hit[1]
    value = make(weight)
    _PACKS[module] = (key, value)
    return value


def _onednn_pack(weight: Tensor) -> Tensor:
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), 1)


def linear(x: Tensor, module: nn.Module, weight: Tensor | None = None) -> Tensor:
    """x (..., in) @ weight.T for one decode row; `weight` defaults to module.weight.

    A module with its own decode kernel (a quantized projection) provides `decode_forward`."""
    fast = getattr(module, "decode_forward", None)
    if fast is not None:
        return fast(x)
    w = module.weight if weight is None else weight
    if x.dtype == torch.bfloat16 and w.dtype == torch.bfloat16 and x.device.type == "cpu" and bf16_native():
        shape = x.shape
        out = torch.ops.mkldnn._linear_pointwise(x.reshape(-1, shape[-1]), packed(module, w, _onednn_pack), None,
                                                 "none", [], "")
        return out.view(*shape[:-1], -1)
    return F.linear(x, w)
