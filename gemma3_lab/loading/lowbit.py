"""Low-bit weights as tensors: group-wise int8 / int4 codes with (lo, step) per group, their
int4 packing, and the decode step's products through torch's packed CPU kernels."""

from __future__ import annotations

import os

import torch
from torch import Tensor, nn

from gemma3_lab.model import kernels

# Scheme, one for both widths: each row of a weight is cut into groups of `group_size` input
# columns; a group stores float32 `lo` and `step`, and w ≈ lo + code * step with
# code in [0, 15] for int4 and [-128, 127] for int8 (its `lo` is then the group's middle).
# The plain forward rebuilds the weight per matmul; decode steps use packed kernels (below).
# Affine (min..max) rather than symmetric (±absmax): at 4 bits, group 128, the 270M's
# projections come back with 10.8% mean relative error, against 12.1-13.0% symmetric.
# int4 codes are packed two per byte: byte j of a row holds column j (low nibble) and
# column j + in/2 (high nibble), so unpacking is one `cat` of two bit operations.
#
# Why not torchao: 0.18.0 with torch 2.13 on this AVX2 CPU runs Int8WeightOnlyConfig, but
# Int4WeightOnlyConfig needs the CUDA-only `mslk` package (its plain_int32 format "does not
# support device 'cpu' yet") and IntxWeightOnlyConfig(int4) keeps one 4-bit code per int8
# byte. torch's own CPU int4/int8 kernels are fast only for bfloat16 activations here.

# ---------------------------------------------------------------------------- tensors
def quantize_tensor(
    w: Tensor, bits: int, group_size: int, search: bool | str = False, importance: Tensor | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """(out, in) weight -> (codes: int8 (out, in) or int4 packed uint8 (out, in/2), lo, step (out, in/group)).

    search: per group, the (lo, step) of least squared error among a few clipped ranges and
    the grids the values may already lie on (`_searched_codes`) instead of min..max;
    "symmetric": step = absmax / (levels // 2) around 0 (GGUF's Q8_0 and Q4_0 grids: their
    blocks come back exactly, and it costs what min..max costs)."""
    N, K = w.shape
    if group_size <= 0 or K % group_size:
        raise ValueError(f"group_size={group_size} must be positive and divide the input width {K}")
    if bits == 4 and K % 2:
        raise ValueError(f"int4 packs two columns per byte: input width {K} must be even")
    g = w.detach().float().reshape(N, K // group_size, group_size)  # (N, G, g)
    levels = 2**bits - 1
    if search and search != "symmetric":
        a = None if importance is None else importance.float().reshape(1, K // group_size, group_size)
        codes, lo, step = _searched_codes(g, levels, a)
    else:
        lo, step = _symmetric(g, levels) if search == "symmetric" else _range(g, g.amin(-1), g.amax(-1), levels)
        codes = _codes(g, lo, step, levels)
    if bits == 8:  # stored signed around the group's middle: the layout torch's int8 kernel reads
        return (codes - 128).to(torch.int8).reshape(N, K), lo + 128 * step, step
    return pack_int4(codes.to(torch.uint8).reshape(N, K)), lo, step


def _codes(g: Tensor, lo: Tensor, step: Tensor, levels: int) -> Tensor:
    """Each weight's nearest code on the group's grid lo + code * step, clamped to the levels."""
    return torch.round((g - lo[..., None]) / step[..., None]).clamp_(0, levels)


def _range(g: Tensor, lo: Tensor, hi: Tensor, levels: int) -> tuple[Tensor, Tensor]:
    step = (hi - lo) / levels
    return lo, torch.where(step > 0, step, torch.ones_like(step))  # constant group: any step is exact


# (fraction of the range clipped below, above): min..max first, so the search is never worse
_CLIPS = ((0.0, 0.0), (0.05, 0.05), (0.0, 0.08), (0.08, 0.0), (0.1, 0.1), (0.15, 0.15), (0.2, 0.2))


def _symmetric(g: Tensor, levels: int) -> tuple[Tensor, Tensor]:
    """lo, step of the grid symmetric around 0 that GGUF's Q8_0 / Q4_0 blocks use: step =
    absmax / (levels // 2) (d = absmax / 127, q in -127..127), codes from 1 to `levels`."""
    amax = g.abs().amax(-1)
    step = _range(g, -amax, amax, levels - 1)[1]
    return -(levels // 2 + 1) * step, step


def _searched_codes(g: Tensor, levels: int, a: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Codes, lo, step of least (a-weighted) squared error per group. Each clipped range gives
    codes; for those codes the best (lo, step) is a weighted least-squares line fit, so
    min..max is only improved. At int4 a few outliers stretch min..max over most of the 16
    levels: on the 270M that made greedy "Once upon a time" degenerate into `<strong>...`.
    a: per input column, how much an error there costs (see `input_importance`)."""
    lo0, rng = g.amin(-1), g.amax(-1) - g.amin(-1)
    a = torch.ones_like(g[:1]) if a is None else a  # (1 or N, G, g)
    n, sw = a.sum(-1), (a * g).sum(-1)
    ranges = [_range(g, lo0 + c * rng, lo0 + (1 - d) * rng, levels) for c, d in _CLIPS]
    ranges += [(lo0, _grid_step(g, rng)), _symmetric(g, levels)]
    best = None
    for lo, step in ranges:
        q = _codes(g, lo, step, levels)
        aq = a * q
        sq, sqq, sqw = aq.sum(-1), (aq * q).sum(-1), (aq * g).sum(-1)
        den = n * sqq - sq * sq  # 0 when every code is equal: keep the range's own fit
        fit = den > 0
        step = torch.where(fit, (n * sqw - sq * sw) / torch.where(fit, den, 1.0), step)
        lo = torch.where(fit, (sw - step * sq) / n, lo)
        err = (a * (torch.addcmul(lo[..., None], q, step[..., None]) - g).pow_(2)).sum(-1)
        if best is None:
            best = [err, q, lo, step]
            continue
        better = err < best[0]
        best = [torch.where(better, err, best[0]), torch.where(better[..., None], q, best[1]),
                torch.where(better, lo, best[2]), torch.where(better, step, best[3])]
    return best[1], best[2], best[3]


def _grid_step(g: Tensor, rng: Tensor) -> Tensor:
    """Per group, the smallest gap between its distinct values: the step of the grid the
    values already lie on when the weights were stored low-bit before (a GGUF Q4_K block of
    32 is min + q * scale with 16 levels), so that grid comes back exactly. Groups off a grid
    give a step too fine for the levels; their clamped codes lose and another range wins."""
    s = g.sort(-1).values
    gap = s[..., 1:] - s[..., :-1]
    gap = torch.where(gap > rng[..., None] * 1e-4, gap, torch.full_like(gap, float("inf"))).amin(-1)
    return torch.where(torch.isfinite(gap), gap, torch.ones_like(gap))  # constant group


def pack_int4(codes: Tensor) -> Tensor:
    """(N, K) codes in [0, 15] -> (N, K/2) bytes: column j low nibble, column j + K/2 high."""
    half = codes.shape[-1] // 2
    return codes[..., :half] | (codes[..., half:] << 4)


def unpack_int4(packed: Tensor) -> Tensor:
    """Inverse of `pack_int4`: (N, K/2) bytes -> (N, K) codes."""
    return torch.cat((packed & 0x0F, packed >> 4), dim=-1)


def dequantize(qweight: Tensor, lo: Tensor, step: Tensor, bits: int) -> Tensor:
    """float32 (out, in) weight from stored codes; groups are implied by `lo`'s shape."""
    codes = unpack_int4(qweight) if bits == 4 else qweight
    N, G = lo.shape
    g = codes.reshape(N, G, -1).float()  # (N, G, group)
    return torch.addcmul(lo[..., None], g, step[..., None]).reshape(N, -1)


# ---------------------------------------------------------------------------- decode kernels
# torch's CPU kernels for weight-only int4 (`_weight_int4pack_mm_for_cpu`, groups of 32..256)
# and per-row int8 (`_weight_int8pack_mm`) read the packed codes directly instead of a float
# copy rebuilt per matmul: 2-2.5x float32's speed at the 270M's shapes on one AVX-512 core.
# They take bfloat16 activations (float32 ones run 10-50x slower), so one decode row is
# rounded to bfloat16 on the way in: a relative 0.4% on activations, far below the weights'
# own quantization error. int4's kernel stores w = (q - 8) * scale + zero, i.e. our
# lo + q * step with zero = lo + 8 * step; its weight layout is its own, made once per module.
_INT4_GROUPS = (32, 64, 128, 256)


def decode_operands(module: nn.Module, qweight: Tensor, lo: Tensor, step: Tensor, bits: int) -> tuple | None:
    """(kind, tensors) that `kernels.packed_mm` computes this weight's decode product from, or
    None where no packed kernel applies (not the CPU, a group the int4 kernel lacks, rows not
    in sixteens, int8 in groups, or FORCE_PLAIN). The packed forms are made once per module."""
    N, G = lo.shape
    if qweight.device.type != "cpu" or os.environ.get(kernels.FORCE_PLAIN) == "1":
        return None
    K = qweight.shape[1] * (2 if bits == 4 else 1)
    if bits == 4 and K // G in _INT4_GROUPS and N % 16 == 0 and hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu"):
        return ("int4", K // G), kernels.packed(module, qweight, lambda q: _int4_pack(q, lo, step))
    if bits == 8 and G == 1 and qweight.dtype == torch.int8:
        scales, offsets = kernels.packed(module, qweight, lambda q: (step[:, 0].to(torch.bfloat16), lo[:, 0].float()))
        return ("int8",), (qweight, scales, offsets)
    return None


def packed_product(module: nn.Module, x: Tensor, qweight: Tensor, lo: Tensor, step: Tensor, bits: int) -> Tensor | None:
    """x (..., in) @ w.T through torch's packed kernel, or None where none applies."""
    if x.device.type != "cpu":
        return None
    ops = decode_operands(module, qweight, lo, step, bits)
    return None if ops is None else kernels.packed_mm(x, *ops)


def _int4_pack(qweight: Tensor, lo: Tensor, step: Tensor) -> tuple[Tensor, Tensor]:
    codes = unpack_int4(qweight).to(torch.int32)
    weight = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)
    scales = torch.stack((step.T, (lo + 8 * step).T), dim=-1).to(torch.bfloat16).contiguous()  # (G, N, 2)
    return weight, scales


