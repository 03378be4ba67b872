"""Modules over low-bit weights: a decoder projection (`QuantLinear`), the tied embedding
table (`QuantEmbedding`) and the tied heads over it (`QuantHead`, `ScreenedHead`)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gemma3_lab.loading.lowbit import decode_operands, dequantize, packed_product, quantize_tensor
from gemma3_lab.model import kernels

_HEAD_CHUNK = 16_384  # vocabulary rows dequantized at a time: bounds the transient float copy


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
    def from_linear(
        cls, linear: nn.Linear, bits: int, group_size: int, search: bool = False, importance: Tensor | None = None
    ) -> "QuantLinear":
        if linear.bias is not None:
            raise ValueError("QuantLinear is for Gemma's bias-free projections")
        return cls(*quantize_tensor(linear.weight, bits, group_size, search, importance), bits, linear.in_features)

    def dequantize(self) -> Tensor:
        return dequantize(self.qweight, self.lo, self.step, self.bits)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.dequantize().to(x.dtype))

    def decode_forward(self, x: Tensor) -> Tensor:
        """The decode step's product: torch's packed low-bit CPU kernels where they apply
        (see `packed_product`), else `forward`."""
        out = packed_product(self, x, self.qweight, self.lo, self.step, self.bits)
        return self.forward(x) if out is None else out

    def decode_operands(self) -> tuple | None:
        """(kind, tensors) of `kernels.packed_mm` for this projection (what the compiled decode
        step passes its graph), or None where no packed kernel applies."""
        return decode_operands(self, self.qweight, self.lo, self.step, self.bits)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, int{self.bits}, group_size={self.group_size}"


class QuantEmbedding(nn.Module):
    """The tied embedding table stored low-bit, one (lo, step) per `group_size` columns of a
    row (None: per row, the layout torch's int8 kernel reads as a head).

    Lookups and `logits` dequantize rows as needed; only `weight` builds the whole table.
    """

    def __init__(self, embedding: nn.Embedding, bits: int = 8, group_size: int | None = None,
                 search: bool | str = False) -> None:
        super().__init__()
        w = embedding.weight
        self.dtype = w.dtype  # what lookups and the head compute in
        self.bits = bits
        group = group_size or w.shape[1]  # None: one group per row
        qweight, lo, step = quantize_tensor(w, bits, group, search)
        self.register_buffer("qweight", qweight)
        self.register_buffer("lo", lo)
        self.register_buffer("step", step)

    def rows(self, ids: Tensor | slice) -> Tensor:
        """Table rows `ids` dequantized to the model dtype, without building the whole table."""
        return dequantize(self.qweight[ids], self.lo[ids], self.step[ids], self.bits).to(self.dtype)

    @property
    def weight(self) -> Tensor:
        """The whole dequantized table in the model dtype; allocates it, so avoid per step."""
        return self.rows(slice(None))

    def forward(self, ids: Tensor) -> Tensor:
        return self.rows(ids.reshape(-1)).reshape(*ids.shape, -1)

    def decode_logits(self, h: Tensor, module: nn.Module) -> Tensor:
        """`logits` of one decode row through the packed low-bit kernel of the table's width."""
        out = packed_product(module, h, self.qweight, self.lo, self.step, self.bits)
        return self.logits(h) if out is None else out

    def logits(self, h: Tensor) -> Tensor:
        """h (..., D) @ table.T -> (..., V), as the tied head computes it in the model dtype."""
        V = self.qweight.shape[0]
        parts = []
        for s in range(0, V, _HEAD_CHUNK):
            parts.append(h @ self.rows(slice(s, min(s + _HEAD_CHUNK, V))).to(h.dtype).T)
        return torch.cat(parts, dim=-1)


class QuantHead(nn.Module):
    """The tied head over a `QuantEmbedding`: shares its buffers, stores nothing of its own."""

    def __init__(self, table: QuantEmbedding) -> None:
        super().__init__()
        self.table = table

    @property
    def weight(self) -> Tensor:
        return self.table.weight

    def rows(self, ids: Tensor | slice) -> Tensor:
        return self.table.rows(ids)

    def forward(self, h: Tensor) -> Tensor:
        return self.table.logits(h)

    def decode_forward(self, h: Tensor) -> Tensor:
        return self.table.decode_logits(h, self)


SCREEN_TOP = 64  # candidates a screened decode step recomputes from the table


class ScreenedHead(nn.Module):
    """The tied head, with an int4 copy of the table that decode steps rank the vocabulary by.

    A decode step reads the int4 copy (a quarter of int8's bytes, through torch's int4
    kernel), takes its SCREEN_TOP highest logits and recomputes exactly those from the table
    (float or `QuantEmbedding`): the logits that decide greedy, top-k and the step record are
    the table's own; the other 262k are the int4 copy's, which enter only the softmax's
    normalizer and the far tail of sampling. Everything but a decode step (prefill, lens,
    attribution) computes from the table. On the 270M (AVX2, 2 cores) the int8 head is 20 ms
    of a 54 ms int4 step, this one 15 ms.
    """

    def __init__(self, table: nn.Module, weight: Tensor, group_size: int = 32) -> None:
        super().__init__()
        self.table = table
        # min..max ranges: the copy only ranks, and a search over 168M weights costs ~40 s
        qweight, lo, step = quantize_tensor(weight, 4, group_size)
        self.register_buffer("qweight", qweight)
        self.register_buffer("lo", lo)
        self.register_buffer("step", step)

    @property
    def weight(self) -> Tensor:
        return self.table.weight

    def forward(self, h: Tensor) -> Tensor:
        if isinstance(self.table, QuantEmbedding):
            return self.table.logits(h)
        return kernels.rows_times(h, self.table.weight)

    def rows(self, ids: Tensor | slice) -> Tensor:
        """Table rows `ids` in the model dtype, without building the whole table."""
        if isinstance(self.table, QuantEmbedding):
            return self.table.rows(ids)
        return self.table.weight[ids]

    def decode_forward(self, h: Tensor) -> Tensor:
        approx = packed_product(self, h, self.qweight, self.lo, self.step, 4)
        if approx is None:  # no int4 kernel here: the table's own product
            return self.forward(h)
        flat = approx.view(-1, approx.shape[-1])
        top = torch.stack([kernels.top_few(r, min(SCREEN_TOP, r.shape[-1]))[1] for r in flat])  # (rows, SCREEN_TOP)
        h2 = h.reshape(-1, h.shape[-1])
        exact = torch.stack([self.rows(t) @ r for t, r in zip(top, h2)])  # the table's logits there
        return flat.scatter_(-1, top, exact.to(flat.dtype)).view_as(approx)

    def extra_repr(self) -> str:
        return f"int4 screen, group_size={self.qweight.shape[1] * 2 // self.lo.shape[1]}, top {SCREEN_TOP}"


