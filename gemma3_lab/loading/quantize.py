"""Weight-only int8 / int4 quantization of a loaded model, stored low-bit on any device: the
decoder projections group-wise, optionally the tied embedding/head int8 per row."""

from __future__ import annotations

import os
from typing import Iterator

import torch
import torch.nn.functional as F
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

MODES = {"int8": 8, "int4": 4}  # quantize= value -> bits per weight
EMBEDDINGS = ("float", "int8")
_HEAD_CHUNK = 16_384  # vocabulary rows dequantized at a time: bounds the transient float copy


def parse_mode(mode: str | None) -> int | None:
    """None (no quantization), "int8" or "int4" -> bits; anything else is a ValueError."""
    if mode is None:
        return None
    if mode not in MODES:
        raise ValueError(f"unknown quantize={mode!r}; valid: None, {', '.join(map(repr, MODES))}")
    return MODES[mode]


# ---------------------------------------------------------------------------- tensors
def quantize_tensor(w: Tensor, bits: int, group_size: int, search: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    """(out, in) weight -> (codes: int8 (out, in) or int4 packed uint8 (out, in/2), lo, step (out, in/group)).

    search: per group, the (lo, step) of least squared error among a few clipped ranges
    (`_searched_codes`) instead of min..max."""
    N, K = w.shape
    if group_size <= 0 or K % group_size:
        raise ValueError(f"group_size={group_size} must be positive and divide the input width {K}")
    if bits == 4 and K % 2:
        raise ValueError(f"int4 packs two columns per byte: input width {K} must be even")
    g = w.detach().float().reshape(N, K // group_size, group_size)  # (N, G, g)
    levels = 2**bits - 1
    if search:
        codes, lo, step = _searched_codes(g, levels)
    else:
        lo, step = _range(g, g.amin(-1), g.amax(-1), levels)
        codes = torch.round((g - lo[..., None]) / step[..., None]).clamp_(0, levels)
    if bits == 8:  # stored signed around the group's middle: the layout torch's int8 kernel reads
        return (codes - 128).to(torch.int8).reshape(N, K), lo + 128 * step, step
    return pack_int4(codes.to(torch.uint8).reshape(N, K)), lo, step


def _range(g: Tensor, lo: Tensor, hi: Tensor, levels: int) -> tuple[Tensor, Tensor]:
    step = (hi - lo) / levels
    return lo, torch.where(step > 0, step, torch.ones_like(step))  # constant group: any step is exact


# (fraction of the range clipped below, above): min..max first, so the search is never worse
_CLIPS = ((0.0, 0.0), (0.05, 0.05), (0.0, 0.08), (0.08, 0.0), (0.1, 0.1), (0.15, 0.15), (0.2, 0.2))


def _searched_codes(g: Tensor, levels: int) -> tuple[Tensor, Tensor, Tensor]:
    """Codes, lo, step of least squared error per group. Each clipped range gives codes; for
    those codes the best (lo, step) is a least-squares line fit, so min..max is only improved.
    At int4 a few outliers stretch min..max over most of the 16 levels: on the 270M that
    made greedy "Once upon a time" degenerate into `<strong><strong>...`."""
    lo0, rng = g.amin(-1), g.amax(-1) - g.amin(-1)
    n, sw = g.shape[-1], g.sum(-1)
    best = None
    for a, b in _CLIPS:
        lo, step = _range(g, lo0 + a * rng, lo0 + (1 - b) * rng, levels)
        q = torch.round((g - lo[..., None]) / step[..., None]).clamp_(0, levels)
        sq, sqq, sqw = q.sum(-1), (q * q).sum(-1), (q * g).sum(-1)
        den = n * sqq - sq * sq  # 0 when every code is equal: keep the range's own fit
        fit = den > 0
        step = torch.where(fit, (n * sqw - sq * sw) / torch.where(fit, den, 1.0), step)
        lo = torch.where(fit, (sw - step * sq) / n, lo)
        err = (torch.addcmul(lo[..., None], q, step[..., None]) - g).pow_(2).sum(-1)
        if best is None:
            best = [err, q, lo, step]
            continue
        better = err < best[0]
        best = [torch.where(better, err, best[0]), torch.where(better[..., None], q, best[1]),
                torch.where(better, lo, best[2]), torch.where(better, step, best[3])]
    return best[1], best[2], best[3]


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


# ---------------------------------------------------------------------------- modules
class QuantLinear(nn.Module):
    """A bias-free linear layer with int8 or int4 group-wise weights (buffers, not parameters).

    The weight is rebuilt in float32 at each call and rounded once to the input's dtype.
    """

    def __init__(self, qweight: Tensor, lo: Tensor, step: Tensor, bits: int, in_features: int) -> None:
        super().__init__()
        self.bits, self.in_features, self.out_features = bits, in_features, qweight.shape[0]
        self.group_size = in_features // lo.shape[1]
        self.register_buffer("qweight", qweight)
        self.register_buffer("lo", lo)
        self.register_buffer("step", step)

    @classmethod
    def from_linear(cls, linear: nn.Linear, bits: int, group_size: int, search: bool = False) -> "QuantLinear":
        if linear.bias is not None:
            raise ValueError("QuantLinear is for Gemma's bias-free projections")
        return cls(*quantize_tensor(linear.weight, bits, group_size, search), bits, linear.in_features)

    def dequantize(self) -> Tensor:
        return dequantize(self.qweight, self.lo, self.step, self.bits)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.dequantize().to(x.dtype))

    def decode_forward(self, x: Tensor) -> Tensor:
        """The decode step's product: torch's packed low-bit CPU kernels where they apply
        (see `packed_product`), else `forward`."""
        out = packed_product(self, x, self.qweight, self.lo, self.step, self.bits)
        return self.forward(x) if out is None else out

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, int{self.bits}, group_size={self.group_size}"


# ---------------------------------------------------------------------------- decode kernels
# torch's CPU kernels for weight-only int4 (`_weight_int4pack_mm_for_cpu`, groups of 32..256)
# and per-row int8 (`_weight_int8pack_mm`) read the packed codes directly instead of a float
# copy rebuilt per matmul: 2-2.5x float32's speed at the 270M's shapes on one AVX-512 core.
# They take bfloat16 activations (float32 ones run 10-50x slower), so one decode row is
# rounded to bfloat16 on the way in: a relative 0.4% on activations, far below the weights'
# own quantization error. int4's kernel stores w = (q - 8) * scale + zero, i.e. our
# lo + q * step with zero = lo + 8 * step; its weight layout is its own, made once per module.
_INT4_GROUPS = (32, 64, 128, 256)


def packed_product(module: nn.Module, x: Tensor, qweight: Tensor, lo: Tensor, step: Tensor, bits: int) -> Tensor | None:
    """x (..., in) @ w.T through torch's packed kernel, or None where none applies."""
    N, G = lo.shape
    K = x.shape[-1]
    if x.device.type != "cpu" or os.environ.get(kernels.FORCE_PLAIN) == "1":
        return None
    x2 = x.reshape(-1, K).to(torch.bfloat16)
    if bits == 4 and K // G in _INT4_GROUPS and hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu"):
        weight, scales = kernels.packed(module, qweight, lambda q: _int4_pack(q, lo, step))
        out = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, weight, K // G, scales)
    elif bits == 8 and G == 1 and qweight.dtype == torch.int8:
        scales = kernels.packed(module, qweight, lambda q: step[:, 0].to(torch.bfloat16))
        # w = lo + code * step per row: the kernel does the codes, the offset is a rank-1 term
        out = torch.ops.aten._weight_int8pack_mm(x2, qweight, scales).float()
        out = out + x2.float().sum(-1, keepdim=True) * lo[:, 0].float()
    else:
        return None
    return out.to(x.dtype).view(*x.shape[:-1], N)


def _int4_pack(qweight: Tensor, lo: Tensor, step: Tensor) -> tuple[Tensor, Tensor]:
    codes = unpack_int4(qweight).to(torch.int32)
    weight = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)
    scales = torch.stack((step.T, (lo + 8 * step).T), dim=-1).to(torch.bfloat16).contiguous()  # (G, N, 2)
    return weight, scales


class QuantEmbedding(nn.Module):
    """The tied embedding table as int8 with one (lo, step) per vocabulary row.

    Lookups and `logits` dequantize rows as needed; only `weight` builds the whole table.
    """

    def __init__(self, embedding: nn.Embedding) -> None:
        super().__init__()
        w = embedding.weight
        self.dtype = w.dtype  # what lookups and the head compute in
        qweight, lo, step = quantize_tensor(w, 8, w.shape[1])  # one group per row
        self.register_buffer("qweight", qweight)
        self.register_buffer("lo", lo)
        self.register_buffer("step", step)

    @property
    def weight(self) -> Tensor:
        """The whole dequantized table in the model dtype; allocates it, so avoid per step."""
        return dequantize(self.qweight, self.lo, self.step, 8).to(self.dtype)

    def forward(self, ids: Tensor) -> Tensor:
        flat = ids.reshape(-1)
        rows = dequantize(self.qweight[flat], self.lo[flat], self.step[flat], 8)
        return rows.to(self.dtype).reshape(*ids.shape, -1)

    def decode_logits(self, h: Tensor, module: nn.Module) -> Tensor:
        """`logits` of one decode row through the int8 kernel (the table is int8 per row)."""
        out = packed_product(module, h, self.qweight, self.lo, self.step, 8)
        return self.logits(h) if out is None else out

    def logits(self, h: Tensor) -> Tensor:
        """h (..., D) @ table.T -> (..., V), as the tied head computes it in the model dtype."""
        V = self.qweight.shape[0]
        parts = []
        for s in range(0, V, _HEAD_CHUNK):
            e = slice(s, min(s + _HEAD_CHUNK, V))
            parts.append(h @ dequantize(self.qweight[e], self.lo[e], self.step[e], 8).to(h.dtype).T)
        return torch.cat(parts, dim=-1)


class QuantHead(nn.Module):
    """The tied head over a `QuantEmbedding`: shares its buffers, stores nothing of its own."""

    def __init__(self, table: QuantEmbedding) -> None:
        super().__init__()
        self.table = table

    def forward(self, h: Tensor) -> Tensor:
        return self.table.logits(h)

    def decode_forward(self, h: Tensor) -> Tensor:
        return self.table.decode_logits(h, self)


# ---------------------------------------------------------------------------- models
@torch.no_grad()
def quantize_model(model: nn.Module, mode: str, group_size: int | None = 128, embedding: str = "float") -> nn.Module:
    """Replace, in place, every decoder projection (q/k/v/o, gate/up/down) by a `QuantLinear`.

    group_size=None: one group per row, the layout torch's int8 decode kernel reads (int4's
    kernel takes groups of 32-256). embedding="float" keeps the tied embedding/head in the
    model dtype, "int8" stores it int8 per row. Choose the dtype first: a later
    `model.to(dtype)` also rounds lo/step.
    """
    # the vision tower and a classifier head stay float: they run once per image or prompt,
    # not once per decoded token
    bits = parse_mode(mode)
    if bits is None:
        return model
    if getattr(model, "quantization", None):
        raise ValueError(f"this model is already quantized ({model.quantization}); load it again")
    if embedding not in EMBEDDINGS:
        raise ValueError(f"unknown embedding={embedding!r}; valid: {', '.join(map(repr, EMBEDDINGS))}")
    for block in model.blocks:
        for parent in (block.attn, block.mlp):
            for name, child in list(parent.named_children()):
                if isinstance(child, nn.Linear):
                    # int4 searches its ranges (see `_searched_codes`); int8's 256 levels need not
                    group = group_size or child.in_features  # None: one group per row (int8's kernel)
                    setattr(parent, name, QuantLinear.from_linear(child, bits, group, search=bits == 4))
    if embedding == "int8":
        if model.lm_head is not None:  # an untied head: int8 per row as well
            w = model.lm_head.weight
            model.lm_head = QuantLinear(*quantize_tensor(w, 8, w.shape[1]), 8, w.shape[1])
        model.embed = QuantEmbedding(model.embed)
        if model.lm_head is None:  # the model's tied path reads embed.weight: route it here
            model.lm_head = QuantHead(model.embed)
    model.quantization = f"{mode}/" + (f"g{group_size}" if group_size else "row") + (" +int8 embedding" if embedding == "int8" else "")
    return model


def weight_counts(model: nn.Module) -> Iterator[tuple[str, int]]:
    """(name, number of weights) of every parameter, and of every quantized projection or
    table by its logical in × out: their codes are buffers, not parameters. A tied QuantHead
    shares its QuantEmbedding, which `named_modules` yields once."""
    for name, p in model.named_parameters():
        yield name, p.numel()
    for name, m in model.named_modules():
        if isinstance(m, QuantLinear):
            yield f"{name}.weight", m.in_features * m.out_features
        elif isinstance(m, QuantEmbedding):
            yield f"{name}.weight", m.qweight.numel()


def tensor_bytes(module: nn.Module) -> int:
    """Bytes of a module's parameters and buffers, each shared tensor counted once."""
    seen = {t.data_ptr(): t.numel() * t.element_size() for t in [*module.parameters(), *module.buffers()]}
    return sum(seen.values())


def linear_weight_bytes(model: nn.Module) -> int:
    """Bytes stored for the decoder projections, float or quantized (codes plus lo/step)."""
    return sum(
        tensor_bytes(child)
        for block in model.blocks
        for parent in (block.attn, block.mlp)
        for child in parent.children()
        if isinstance(child, (nn.Linear, QuantLinear))
    )
