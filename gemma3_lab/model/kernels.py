"""Matmul kernels for decode-sized products (one token, a weight read once), chosen by what
the CPU runs fast; the plain path (`F.linear`) is the reference they are tested against.

float32: one row takes the C loop of `gemv` where the CPU has AVX-512 (it reads memory faster
than MKL's sgemv there), else the head is cut over the threads where MKL's sgemv would read it
on one thread (`split_gemv`, below); a few rows go weight @ x.T where that is faster (`rows_times`).

bfloat16 (where the CPU runs it natively, `bf16_native`): torch's `F.linear` with one
bfloat16 row reorders the weight on every call. One row takes the C loop of `gemv`
where it is built (oneDNN's AMX kernel is slow for a single row inside a decode step); several
rows, or a CPU without AVX512-BF16, take oneDNN on a copy of the weight packed once into its
blocked layout (`onednn_packed`). Packed copies are remade whenever the weight changes (an
edit in place bumps its version), so interventions on weights are always seen. Quantized
projections bring their own packed kernels (`decode_forward`, in gemma3_lab.loading.quantize).
"""

from __future__ import annotations

import os
import threading
import time
import weakref
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gemma3_lab.model import gemv

# module -> ((data_ptr, version, dtype, shape) of the weight it was made from, packed form)
_PACKS: "weakref.WeakKeyDictionary[nn.Module, tuple[tuple, object]]" = weakref.WeakKeyDictionary()
FORCE_PLAIN = gemv.PLAIN  # set to 1: every product takes the plain F.linear


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


# data_ptr -> (weakref to the bfloat16 weight, its version, shape, oneDNN's packed copy). Keyed by
# the weight itself rather than its module: the compiled step's graph sees only tensors.
_ONEDNN: dict[int, tuple] = {}


def onednn_packed(weight: Tensor) -> Tensor:
    """oneDNN's blocked copy of a bfloat16 weight (made once, remade after an edit in place),
    dropped when the weight is freed."""
    ptr = weight.data_ptr()
    hit = _ONEDNN.get(ptr)
    if hit is not None:
        ref, version, shape, pk = hit
        # the weight that owns this address is alive, so no other storage can sit there
        if ref() is not None and version == weight._version and shape == weight.shape:
            return pk
    pk = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), 1)
    _ONEDNN[ptr] = (weakref.ref(weight, lambda _, ptr=ptr: _ONEDNN.pop(ptr, None)), weight._version, weight.shape, pk)
    return pk


def bf16_product(x: Tensor, weight: Tensor) -> Tensor:
    """x (rows, in) @ weight.T, both bfloat16, on a CPU where `bf16_native()`: one row through
    the C loop where it is built (`gemv`: oneDNN's AMX kernel is slow for one row), else
    oneDNN on its packed copy of the weight."""
    if x.shape[0] == 1 and gemv.available(torch.bfloat16):
        return gemv.gemv(x, weight)
    return torch.ops.mkldnn._linear_pointwise(x, onednn_packed(weight), None, "none", [], "")


# `bf16_product` as an op of its own, for the compiled decode step: the graph passes the plain
# weight (a packed oneDNN tensor cannot enter a graph) and Inductor calls the op whole. Declared
# through torch.library.Library rather than `custom_op`, whose wrapper cost 18 us a call
# against 3.5 here (127 calls a token).
_OPS = torch.library.Library("gemma3_lab", "DEF")
_OPS.define("bf16_product(Tensor x, Tensor weight) -> Tensor")
_OPS.impl("bf16_product", bf16_product, "CPU")
torch.library.register_fake("gemma3_lab::bf16_product", lambda x, weight: x.new_empty(x.shape[0], weight.shape[0]),
                            lib=_OPS)
bf16_product_op = torch.ops.gemma3_lab.bf16_product.default


FEW_ROWS = 128  # up to this many rows, `rows_times` may compute weight @ x.T (see there)
FEW_ENV = "GEMMA3_LAB_FEW_ROWS"  # "1" / "0": always / never weight @ x.T for a few rows (default: measured)
_FEW: dict[tuple, bool] = {}  # (rows, cols, threads) -> weight @ x.T pays


# One row against a large float32 weight (the tied head, 262,144 x 640). MKL's sgemv runs it
# on one thread on some CPUs: on a 2-core AMD EPYC it took 44 ms with 2 threads or 1, against
# 20 ms for a plain streaming read of the same bytes (W.sum()). Cut into one block of rows
# per thread, each block's sgemv on its own core, it took 25 ms, with the same bits (each
# output is the same dot product). Where MKL threads its sgemv itself, cutting gains nothing
# and could cost: so the first product of each such shape times both ways (a quarter of a
# second, once per process) and keeps the faster. Where MKL threads its sgemv, the rows at its
# own cuts take another kernel, so its last bits depend on how it cut; the cut taken here then
# agrees with F.linear to float32 reordering (the plain forward and the lean step still agree
# to the bit: both multiply through `rows_times`, and so the same way).
SPLIT_MIN = 1 << 24  # weights of at least this many elements (the head: 168 M; a projection: 1.3 M)
SPLIT_ENV = "GEMMA3_LAB_SPLIT_GEMV"  # "1" / "0": always / never cut (default: measured)
_SPLIT: dict[tuple, bool] = {}  # (rows, cols, threads) -> cut pays
_POOL: tuple[int, ThreadPoolExecutor] | None = None  # (workers, pool): the threads beside the caller's
_POOL_LOCK = threading.Lock()


def split_pays(weight: Tensor) -> bool:
    """Does a one-row product with this weight take `split_gemv`? (See the note above.)"""
    if weight.dtype != torch.float32 or weight.device.type != "cpu" or weight.dim() != 2:
        return False
    forced = os.environ.get(SPLIT_ENV)
    if os.environ.get(FORCE_PLAIN) == "1" or forced == "0" or torch.get_num_threads() < 2:
        return False
    if forced == "1":
        return True
    if weight.numel() < SPLIT_MIN:
        return False
    return _measured(_SPLIT, weight, 1, split_gemv)


_MEASURE_LOCK = threading.Lock()  # one timing at a time, and each shape's choice made once


@torch.no_grad()
def _measured(memo: dict, weight: Tensor, rows: int, other: Callable[[Tensor, Tensor], Tensor]) -> bool:
    """Is `other(x, weight)` faster than F.linear for `rows` rows of x against this weight?
    Timed both ways on the first ask for its shape (and thread count), kept for the process,
    so that every product of that shape takes the same way (the same bits) from then on."""
    key = (*weight.shape, torch.get_num_threads())
    if key in memo:
        return memo[key]
    with _MEASURE_LOCK:
        if key not in memo:
            x = torch.randn(rows, weight.shape[1])
            ways = {False: lambda: F.linear(x, weight), True: lambda: other(x, weight)}
            best = dict.fromkeys(ways, float("inf"))
            for f in ways.values():
                f()  # warm: pages, threads
            for _ in range(3):  # in turns, so a busy moment slows both
                for pays, f in ways.items():
                    t = time.perf_counter()
                    f()
                    best[pays] = min(best[pays], time.perf_counter() - t)
            memo[key] = best[True] < 0.9 * best[False]
    return memo[key]


def split_gemv(x: Tensor, weight: Tensor) -> Tensor:
    """x (1, in) @ weight.T as one sgemv per thread over its own block of weight rows (the
    calling thread takes the first block); bit-for-bit `F.linear(x, weight)` where MKL's sgemv
    runs a row on one thread (where the cut is chosen; see above)."""
    parts = torch.get_num_threads()
    N = weight.shape[0]
    out = x.new_empty(1, N)
    # blocks start at multiples of 64 rows: MKL gives a block's last few rows (past a multiple
    # of its unroll) another kernel, so only the whole weight's own last rows may take it
    bounds = [N * i // parts // 64 * 64 for i in range(parts)] + [N]
    pool = _pool(parts)
    futures = [pool.submit(_rows_into, x, weight, a, b, out) for a, b in zip(bounds[1:-1], bounds[2:]) if b > a]
    _rows_into(x, weight, 0, bounds[1], out)
    for f in futures:
        f.result()
    return out


def _rows_into(x: Tensor, weight: Tensor, a: int, b: int, out: Tensor) -> None:
    with torch.no_grad():  # grad mode is per thread; `out=` refuses tensors that want grad
        torch.mm(x, weight[a:b].T, out=out[:, a:b])


def _pool(parts: int) -> ThreadPoolExecutor:
    global _POOL
    with _POOL_LOCK:
        if _POOL is None or _POOL[0] < parts - 1:
            workers = max(parts - 1, 1)
            _POOL = (workers, ThreadPoolExecutor(workers, thread_name_prefix="gemma3-lab-gemv"))
        return _POOL[1]


def rows_times(x: Tensor, weight: Tensor) -> Tensor:
    """x (..., in) @ weight.T, fast for 2..FEW_ROWS rows of x against a float32 weight read
    from memory (a projection of a batch decoding together, a short prompt, the head).

    On some CPUs MKL's float32 GEMM with a handful of rows against a transposed weight runs
    at a fraction of the speed of the same product written weight @ x.T: on a 2-core AVX2
    EPYC, two rows through the 262k-row head took 220 ms that way and 73 ms this way, and the
    18 layers' projections of a two-row decode step 59 ms against 27 ms (one row: 37 ms either
    way). On others it is the other way round: on a 2-core AVX-512 Xeon, two rows through the
    head took 24 ms through F.linear and 61 ms as weight @ x.T, the projections 21 ms and 47.
    So each weight's shape is timed both ways once (`few_rows_pay`; GEMMA3_LAB_FEW_ROWS=1 or
    =0 forces it). Up to `gemv.MAX_ROWS` rows take the C loop of `gemv` where the CPU has
    AVX-512 (each row with its own one-row bits); else one row takes `split_gemv` where that
    pays (the head on some CPUs), else, like more than FEW_ROWS rows, other dtypes or
    FORCE_PLAIN, the plain F.linear; the plain forward and every decode step multiply here,
    so they keep the same bits.
    """
    rows = x.reshape(-1, x.shape[-1])
    n = rows.shape[0]
    # neither the C loop nor the cut records an autograd graph (gradients through the head,
    # for input attribution, take the plain F.linear)
    if n <= gemv.MAX_ROWS and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)):
        if _f32_gemv(x, weight):
            return gemv.gemv(rows, weight).view(*x.shape[:-1], weight.shape[0])
        if n == 1 and split_pays(weight):
            return split_gemv(rows, weight).view(*x.shape[:-1], weight.shape[0])
    if n == 1 or n > FEW_ROWS or not few_rows_pay(weight):
        return F.linear(x, weight)
    return _transposed(rows, weight).view(*x.shape[:-1], weight.shape[0])


def _f32_gemv(x: Tensor, weight: Tensor) -> bool:
    return (x.dtype == weight.dtype == torch.float32 and x.device.type == weight.device.type == "cpu"
            and weight.dim() == 2 and gemv.available(torch.float32))


def _float_product(x: Tensor, weight: Tensor) -> Tensor:
    """`rows_times` for the compiled step, whose graph takes this op only where the C loop is
    built and whose rows are (rows, in) without gradients: straight to the loop, the same bits
    (the op 11 us a call against 17 through rows_times, 127 calls a token)."""
    if x.shape[0] <= gemv.MAX_ROWS and gemv.available(torch.float32):
        return gemv.gemv(x, weight)
    return rows_times(x, weight)


# `rows_times` as an op of its own, for the compiled float32 step where the C loop is used:
# Inductor calls it whole, so the graph's products have the plain forward's bits
_OPS.define("float_product(Tensor x, Tensor weight) -> Tensor")
_OPS.impl("float_product", _float_product, "CPU")
torch.library.register_fake("gemma3_lab::float_product",
                            lambda x, weight: x.new_empty(*x.shape[:-1], weight.shape[0]), lib=_OPS)
float_product_op = torch.ops.gemma3_lab.float_product.default


def few_rows_pay(weight: Tensor) -> bool:
    """Does a product of a few rows with this weight take weight @ x.T? (See `rows_times`.)"""
    if weight.dtype != torch.float32 or weight.device.type != "cpu" or weight.dim() != 2:
        return False
    forced = os.environ.get(FEW_ENV)
    if os.environ.get(FORCE_PLAIN) == "1" or forced == "0":
        return False
    return forced == "1" or _measured(_FEW, weight, 2, _transposed)


def _transposed(x: Tensor, weight: Tensor) -> Tensor:
    return (weight @ x.T).T.contiguous()


class Projection(nn.Linear):
    """A bias-free nn.Linear (hooks, state dict and quantization see an nn.Linear) whose
    product is `rows_times`."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__(in_features, out_features, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return rows_times(x, self.weight)


def linear(x: Tensor, module: nn.Module, weight: Tensor | None = None) -> Tensor:
    """x (..., in) @ weight.T for a decode step's row (or the few rows of a batch decoding
    together); `weight` defaults to module.weight. Float32 goes through `rows_times`, as the
    plain forward's projections and head do, so both compute the same bits.

    A module with its own decode kernel (a quantized projection) provides `decode_forward`."""
    fast = getattr(module, "decode_forward", None)
    if fast is not None:
        return fast(x)
    w = module.weight if weight is None else weight
    if x.dtype == torch.bfloat16 and w.dtype == torch.bfloat16 and x.device.type == "cpu" and bf16_native():
        shape = x.shape
        out = bf16_product(x.reshape(-1, shape[-1]), w)
        return out.view(*shape[:-1], -1)
    return rows_times(x, w)


def packed_mm(x: Tensor, kind: tuple, parts: tuple[Tensor, ...]) -> Tensor:
    """x (..., in) @ w.T through torch's packed low-bit CPU kernels, from the operands a
    quantized projection gives (`decode_operands` in gemma3_lab.loading): kind ("int4", group)
    with (packed codes, scales and zeros), or ("int8",) with (codes, bfloat16 scales, float32
    offsets per row). The kernels take bfloat16 activations, so x is rounded on the way in.
    Pure tensor code: the eager decode step and the compiled one both compute it."""
    K = x.shape[-1]
    x2 = x.reshape(-1, K).to(torch.bfloat16)
    if kind[0] == "int4":
        out = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, parts[0], kind[1], parts[1])
    else:  # w = lo + code * step per row: the kernel does the codes, the offset is a rank-1 term
        codes, scales, lo = parts
        out = torch.ops.aten._weight_int8pack_mm(x2, codes, scales).float()
        out = out + x2.float().sum(-1, keepdim=True) * lo
    return out.to(x.dtype).view(*x.shape[:-1], -1)


TOP_BLOCK = 256  # `top_few`'s block of the vocabulary


def top_few(x: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """torch.topk(x, k) of a 1-d x, highest first, for a few of a large vocabulary (a step
    record's top candidates, the int4 screen's): the maxima of blocks of TOP_BLOCK, the k
    blocks with the highest, then the best k of those k blocks. Exact: each of the top k lies
    in a block whose maximum is at least the k-th value, and the k blocks kept hold every value
    above it and k at or above it. On the Xeon, of 262,144 logits: 57 us for 5 and 141 us for 64,
    against torch.topk's 880 (one pass keeping a heap). Tied values may come in another order
    than torch.topk's, which promises none either."""
    n = x.shape[-1]
    if n < 2**16 or n % TOP_BLOCK or k > n // TOP_BLOCK:
        top = torch.topk(x, k)
        return top.values, top.indices
    blocks = x.view(-1, TOP_BLOCK)
    kept = blocks.amax(1).topk(k).indices
    top = blocks[kept].flatten().topk(k)
    ids = (kept[:, None] * TOP_BLOCK + torch.arange(TOP_BLOCK, device=x.device)).flatten()[top.indices]
    return top.values, ids

