"""The lean decode step compiled by `torch.compile` (Inductor, C++ built with the machine's
gcc): one graph over tensors for the whole step, so the ~40 small ops of each layer between
its matmuls (norms, q/k norms, RoPE, cache writes, softmax, residuals) run as a few fused
loops instead of one dispatch each from Python, and the step record's reductions over the
vocabulary (logsumexp, argmax) are fused into the graph's end.

Which models: CPU models with float32 activations, whose float32 products are the C loop of
`gemv` where the CPU has AVX-512 (called whole, as an op), else MKL's gemv (or Inductor's own
threaded loop where MKL runs a row on one thread): `_float_kind`; or
int8/int4 ones whose packed kernels apply (`kernels.packed_mm`, called inside the graph; a
quantized head runs its own kernels (the int4 screen) after the graph, a quantized table is
looked up before it); and bfloat16 models where the CPU has native bfloat16 products, every
product `kernels.bf16_product` (the C gemv of `gemv`, or oneDNN) called whole from the
graph as an op of its own. The bfloat16 graph's fused loops round to bfloat16 only at their
ends, not after every op as the eager step does, so its logits differ from the eager step's
by bfloat16 noise (tested as the eager step is against the plain path).

Measured on a 2-core Xeon (AVX10.1, AMX) on 2026-12-07, a token of the 270M: float32 63 ms
compiled against 81 eager; bfloat16 38 ms compiled against 48 eager (bench/bench_core.py
prints today's). An earlier bfloat16 graph, with Inductor's own bfloat16 products, ran
slower than the eager step (41 against 34 ms): the products must stay whole.

Compiling costs half a minute to a minute on two cores, once per process and model shape
(and kind of projection): the
graph is traced with dynamic shapes, so one graph serves every cache length and buffer
size. Nothing waits for it: `start` compiles in a background thread (on throwaway buffers)
and `step` returns None until the graph is ready, so a decode step falls back to the eager
lean step meanwhile, and for good if the compiler is missing or fails (`status` says why).

The step reads and writes the caches' own buffers (`LayerCache`), so a generation can
switch between this step, the eager lean step and the plain forward at any token.

Where the native step applies (`native_decode`: the whole step in one C call, on CPUs with
AVX-512 or AVX2), it runs first and nothing is compiled (`start` says "native"): in three bench runs
on the Xeon its tok/s were 1.04-1.27x this step's in float32, 1.27-1.39x in bfloat16 and
1.27-1.72x for the quantized defaults.
"""

from __future__ import annotations

import os
import shutil
import threading
import time
import weakref
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from gemma3_lab.config import AttentionType
from gemma3_lab.model import gemv, kernels, native_decode
from gemma3_lab.model.kv_cache import KVCache
from gemma3_lab.model.network import embed_scale, soft_cap
from gemma3_lab.model.norm import fused_rms_norm
from gemma3_lab.model.rope import apply_rope, rope_tables

# Dynamo specialises an int argument that is 0 or 1 (a later 2 would recompile, half a
# minute): slot bounds enter the graph shifted up by this much and are shifted back inside.
_SHIFT = 2


@dataclass(frozen=True)
class CompileStatus:
    """Where the compiled step of one model stands."""

    state: str  # "off" (never asked) | "compiling" | "ready" | "failed" | "unavailable" | "native" (not needed)
    seconds: float | None = None  # compile time, once ready or failed
    reason: str = ""  # why failed / unavailable

    def describe(self) -> str:
        if self.state == "ready":
            return f"compiled decode step ready (compiled in {self.seconds:.0f} s)"
        if self.state == "compiling":
            return "compiling the decode step in the background (the eager lean step runs meanwhile)"
        if self.state == "native":
            return "nothing to compile: the native decode step (C) runs this model"
        if self.state in ("failed", "unavailable"):
            return f"compiled decode step {self.state}: {self.reason}; the eager lean step runs"
        return "compiled decode step not started"


class _Entry:
    def __init__(self) -> None:
        self.status = CompileStatus("off")
        self.thread: threading.Thread | None = None


_ENTRIES: "weakref.WeakKeyDictionary[torch.nn.Module, _Entry]" = weakref.WeakKeyDictionary()
_LOCK = threading.Lock()
_GRAPH = None  # the torch.compile'd `_step_graph`, made on first use (importing Inductor costs seconds)


def status(net) -> CompileStatus:
    entry = _ENTRIES.get(net)
    return CompileStatus("off") if entry is None else entry.status


def unsupported(net) -> str | None:
    """Why this model cannot take the compiled step (None: it can). Asked again at each
    generation's first step: a model may be quantized or moved after it was compiled."""
    # `_parameters`, not `.weight`: a quantized table's `weight` would build the whole float table
    w = net.final_norm.weight
    if w.device.type != "cpu":
        return f"the model is on {w.device.type}, and only the CPU step is compiled"
    if w.dtype not in (torch.float32, torch.bfloat16):
        return f"the model is {str(w.dtype).removeprefix('torch.')}; only float32 and bfloat16 activations are compiled"
    if w.dtype == torch.bfloat16 and not kernels.bf16_native():
        return "bfloat16 is compiled only where the CPU runs bfloat16 products natively (AVX-512 and up)"
    if net.vision is not None:
        return "multimodal models decode with the eager lean step"
    head = net.embed if net.lm_head is None else net.lm_head
    if w.dtype == torch.bfloat16:  # every product bfloat16 (`kernels.bf16_product`)
        for m in [p for b in net.blocks for p in b.projections()] + [head]:
            v = m._parameters.get("weight")
            if getattr(m, "decode_forward", None) is not None or v is None or v.dtype != torch.bfloat16:
                return "a bfloat16 model with a quantized or non-bfloat16 product keeps the eager lean step"
        return None
    for m in (p for b in net.blocks for p in b.projections()):
        if getattr(m, "decode_operands", None) is not None:
            if m.decode_operands() is None:
                return ("a quantized projection has no packed CPU kernel here (its group or shape, or "
                        "GEMMA3_LAB_PLAIN_KERNELS=1)")
        elif _float32(m) is None:
            return "a projection is neither float32 nor quantized with a packed kernel"
    if getattr(head, "decode_forward", None) is None and _float32(head) is None:
        return "the head is neither float32 nor quantized"
    return None


def _float32(m) -> Tensor | None:
    w = m._parameters.get("weight")
    return w if w is not None and w.dtype == torch.float32 else None


def start(net, background: bool = True, announce: Callable[[CompileStatus], None] | None = None) -> CompileStatus:
    """Compile the step for this model (once): in a background thread, or here and now with
    background=False. Returns the status at once; `status(net)` follows it, and `announce`
    (if given) is called with the final status when the compile ends. Where the native step
    applies (`native_decode`), which every step of one row takes first, nothing is compiled: the
    status says "native" (asked again, a model quantized since then compiles)."""
    if native_decode.why_not(net) is None:
        if announce is not None:
            announce(CompileStatus("native"))
        return CompileStatus("native")
    with _LOCK:
        entry = _ENTRIES.setdefault(net, _Entry())
        if entry.status.state != "off":
            return entry.status
        no_cc = all(shutil.which(cc) is None for cc in ("gcc", "cc", "clang"))
        why = "no C compiler on this machine (Inductor needs gcc or clang)" if no_cc else unsupported(net)
        if why is not None:
            entry.status = CompileStatus("unavailable", reason=why)
            return entry.status
        entry.status = CompileStatus("compiling")
        if background:
            entry.thread = threading.Thread(target=_compile, args=(net, entry, announce), name="gemma3-lab-compile",
                                            daemon=True)
            entry.thread.start()
            return entry.status
    _compile(net, entry, announce)
    return entry.status


def wait(net, timeout: float | None = None) -> CompileStatus:
    """Block until a background compile has finished (or `timeout` seconds passed)."""
    entry = _ENTRIES.get(net)
    if entry is not None and entry.thread is not None:
        entry.thread.join(timeout)
    return status(net)


def _compile(net, entry: _Entry, announce=None) -> None:
    t0 = time.perf_counter()
    try:
        with torch.no_grad():  # grad mode is per thread, and the graph is guarded on it
            _warm_up(net)
        entry.status = CompileStatus("ready", time.perf_counter() - t0)
    except Exception as e:  # noqa: BLE001 - any compiler failure leaves the eager step in charge
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        entry.status = CompileStatus("failed", time.perf_counter() - t0, f"{type(e).__name__}: {first[:200]}")
    if announce is not None:
        announce(entry.status)


def _graph():
    global _GRAPH
    if _GRAPH is None:
        _cache_per_isa()
        _GRAPH = torch.compile(_step_graph, dynamic=True, fullgraph=True)
    return _GRAPH


def _cache_per_isa() -> None:
    """Inductor's on-disk cache (kept between processes) gets one folder per vector ISA.
    It keys a built C++ kernel by a source that need not change with the ISA, so a kernel
    built under ATEN_CPU_CAPABILITY=avx2 and one built for AVX-512 can meet: seen here with
    torch 2.13, an AVX2 step took the other's kernel and returned garbage logits. A folder
    the user chose ($TORCHINDUCTOR_CACHE_DIR) is left as it is."""
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    base = os.path.abspath(default_cache_dir())
    chosen = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    # Inductor sets the variable to its default itself, and a child process inherits ours
    ours = chosen is None or os.path.abspath(chosen) == base or os.path.basename(chosen).startswith("gemma3_lab-")
    if not ours:
        return
    isa = torch.backends.cpu.get_cpu_capability().lower()  # follows ATEN_CPU_CAPABILITY
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = os.path.join(base, f"gemma3_lab-{isa}")


def _warm_up(net) -> None:
    """Trace and build the graph on throwaway buffers shaped like a cache's. The sizes and
    slot bounds differ from each other here (local and global, start and end), so that no
    coincidence becomes a guard that a real cache would fail."""
    cfg = net.config.text
    cache = KVCache(cfg)
    w = net.final_norm.weight  # not embed.weight: a quantized table's would build the float table
    for lc in cache.layers:
        n = 3 if lc.keep is None else 5
        like = w.new_zeros(1, cfg.num_kv_heads, n, cfg.head_dim)
        lc.update(like, like)
        if lc.keep is not None:
            lc._start = 1  # as if the window had slid
        for buf in (lc._k, lc._v):  # slots: any number (tensors in a list are otherwise traced static)
            torch._dynamo.mark_dynamic(buf, 2)
    cache.next_position = torch.tensor([5])
    _run(net, 0, cache, _owners(net))


def step(net, token_id: int, cache: KVCache) -> Tensor | None:
    """(V,) float logits of the compiled step, or None when it is not ready for this model
    (the caller has already checked that a lean step applies at all)."""
    entry = _ENTRIES.get(net)
    if entry is None or entry.status.state != "ready":
        return None
    if "compiled" not in cache.plan:
        cache.plan["compiled"] = None if unsupported(net) else _owners(net)
    owners = cache.plan["compiled"]
    if owners is None:
        return None
    try:
        return _run(net, token_id, cache, owners, guarded=True)
    except Exception:  # noqa: BLE001 - the cache is untouched until a step succeeds
        return None


def _owners(net) -> tuple:
    """What a step passes its graph, made once per generation: per block the six norms and
    the seven projections (in `_step_graph`'s order) and how each projection is computed
    (("float",) or a packed kernel's kind, static in the graph), then the final norm, and
    the head and embedding where the graph computes them (float tables; a quantized head
    runs its own kernels after the graph, a quantized table is looked up before it), and how
    the graph multiplies by float weights (`_float_kind`).
    Weights are read afresh every step (an edit or a new Parameter is seen)."""
    norms = [b.norms() for b in net.blocks]
    projections = [b.projections() for b in net.blocks]
    head = net.embed if net.lm_head is None else net.lm_head
    head = head if getattr(head, "decode_forward", None) is None else None
    floats = ("bf16",) if net.final_norm.weight.dtype == torch.bfloat16 else _float_kind(head)
    kinds = tuple(tuple(floats if getattr(m, "decode_operands", None) is None else m.decode_operands()[0]
                        for m in row) for row in projections)
    w = net.embed._parameters.get("weight")
    table = net.embed if w is not None and w.dtype in (torch.float32, torch.bfloat16) else None
    return norms, projections, kinds, net.final_norm, head, floats, table


def _float_kind(head) -> tuple:
    """How the graph multiplies by a float32 weight: ("gemv",) the C loop (`kernels.rows_times`
    as an op, so the graph has the plain forward's bits) where the CPU has AVX-512; else
    ("float",) MKL's gemv, or ("loop",) Inductor's own loop (a reduction over each row, its
    OpenMP threads sharing the rows) where MKL's gemv runs a row on one thread, as the float head's timing (`kernels.split_pays`)
    tells. On a 2-core AMD EPYC the loop read the 126 projections in 20 ms against MKL's 25
    and the head in 22 against 44 (so the head stays in the graph, with the step record's
    reductions fused after it); where MKL threads its gemv, it is kept."""
    if gemv.available(torch.float32):
        return ("gemv",)
    w = None if head is None else _float32(head)
    return ("loop",) if w is not None and kernels.split_pays(w) else ("float",)


def _operands(m) -> tuple[Tensor, ...]:
    if getattr(m, "decode_operands", None) is None:
        return (m._parameters["weight"],)
    return m.decode_operands()[1]


def _run(net, token_id: int, cache: KVCache, owners: tuple, guarded: bool = False) -> Tensor:
    """One compiled step. guarded (a generation's steps; not the warm-up, which must compile):
    a guard that fails would recompile for half a minute in the middle of a generation, so
    it raises instead and the eager lean step takes the token."""
    cfg = net.config.text
    positions = cache.next_position[:, None]  # (1, 1)
    is_global = tuple(t is AttentionType.GLOBAL for t in cfg.layer_types)
    # every layer of a type has the same kept slots (one prefill, the same steps since)
    like = net.final_norm.weight.new_empty(1, cfg.num_kv_heads, 1, cfg.head_dim)
    bounds = {}
    for lc, g in zip(cache.layers, is_global):
        lc._make_room(like, 1)
        span = (lc._start, lc._end)
        if bounds.setdefault(g, span) != span:
            raise RuntimeError("layers of one type disagree on their kept slots")
    lo_l, end_l = bounds.get(False, (0, 0))
    lo_g, end_g = bounds.get(True, (0, 0))
    norms, projections, kinds, final, head, floats, table = owners
    ids = torch.tensor([[token_id]])
    if table is None:  # a quantized table: its row looked up here, the graph starts from it
        first, table_w, scale = net._embed(ids, None), None, None
    else:
        table_w = table._parameters["weight"]
        first, scale = ids, embed_scale(cfg, table_w.dtype)
    # `_parameters` directly: nn.Module.__getattr__ for 236 weights cost 0.3 ms a step
    weights = [([m._parameters["weight"] for m in n], [_operands(m) for m in p]) for n, p in zip(norms, projections)]
    a0 = net.blocks[0].attn
    # Dynamo's guards (dtype, shape, strides of ~270 tensors: 0.4 ms, 1% of a step) run at a
    # generation's first step and whenever a cache buffer was replaced; between those what
    # they check stays put: the modules were fixed for this cache by `unsupported` and
    # `_owners`, the buffers are the same tensors. (A weight swapped for one of another shape
    # or dtype in the middle of a generation would go unchecked until the next one.)
    buffers = tuple(id(lc._k) for lc in cache.layers)
    trusted = guarded and cache.plan.get("guarded") == buffers
    with torch.compiler.set_stance("fail_on_recompile" if guarded else "default", skip_guard_eval_unsafe=trusted):
        out = _graph()(first, table_w, scale, positions, net.inv_freq_local, net.inv_freq_global, weights,
                       [lc._k for lc in cache.layers], [lc._v for lc in cache.layers],
                       lo_l + _SHIFT, end_l + _SHIFT, lo_g + _SHIFT, end_g + _SHIFT,
                       final._parameters["weight"], None if head is None else head._parameters["weight"],
                       is_global, kinds, floats, a0.n_heads, a0.n_kv, a0.head_dim, a0.scale, cfg.rms_norm_eps,
                       net.final_softcap)
    if guarded:
        cache.plan["guarded"] = buffers
    for lc in cache.layers:  # what LayerCache.update does after its write of one slot
        lc._end += 1
        if lc.keep is not None:
            lc._start = max(lc._start, lc._end - lc.keep)
    cache.advance(1, None, None, positions)
    if head is None:  # a quantized head: its packed kernels on the graph's final hidden state
        cache.plan["summary"] = None
        return net.softcap(kernels.linear(out, net.lm_head))[0, -1].float()
    cache.plan["summary"] = out  # read by `summary`
    return out[0]


def summary(cache: KVCache, logits: Tensor) -> tuple[Tensor, int] | None:
    """(logsumexp, first argmax) of `logits` where the compiled step that made them computed
    both in its graph, else None: what `generate` records and chooses from without another
    pass over the vocabulary."""
    got = cache.plan.get("summary")
    if got is None or got[0] is not logits:
        return None
    return got[1], int(got[2])


def _norm(x: Tensor, w: Tensor, eps: float) -> Tensor:
    return fused_rms_norm(x, 1.0 + w.float(), eps)  # (1 + w) inside the graph: weights come in raw


def _mm(x: Tensor, kind: tuple, parts: tuple[Tensor, ...]) -> Tensor:
    if kind[0] == "float":
        return F.linear(x, parts[0])
    if kind[0] == "bf16":  # one call of an op the graph does not look into
        return kernels.bf16_product_op(x.reshape(-1, x.shape[-1]), parts[0]).view(*x.shape[:-1], -1)
    if kind[0] == "gemv":  # likewise
        return kernels.float_product_op(x.reshape(-1, x.shape[-1]), parts[0]).view(*x.shape[:-1], -1)
    if kind[0] == "loop":  # fused by Inductor into one loop over the rows: no (rows, in) product is made
        return (x.unsqueeze(-2) * parts[0]).sum(-1)
    return kernels.packed_mm(x, kind, parts)


def _step_graph(first, table, emb_scale, positions, freq_l, freq_g, weights, ks, vs, lo_l, end_l, lo_g, end_g,
                final_w, head, is_global, kinds, floats, N: int, K: int, H: int, scale: float, eps: float,
                cap: float | None):
    """The lean step (`fast_decode.decode_step`, `_block`, `_attention`) over tensors: the new
    token's id (1, 1) with its float `table`, or its embedding (1, 1, D) where `table` is
    None, at `positions` (1, 1); each layer writes its key/value at slot `end` of its buffers
    and attends over slots lo..end. Returns the (V,) float32 logits, their logsumexp and
    argmax; or, where `head` is None, the final hidden state (1, 1, D) for the caller's head."""
    h = first if table is None else F.embedding(first, table) * emb_scale
    cos_l, sin_l = rope_tables(positions, freq_l, h.dtype)
    cos_g, sin_g = rope_tables(positions, freq_g, h.dtype)
    for i, ((n1, qn, kn, n2, n3, n4), (wq, wk, wv, wo, wg, wu, wd)) in enumerate(weights):
        kq, kk_, kv, ko, kg, ku, kd = kinds[i]
        cos, sin = (cos_g, sin_g) if is_global[i] else (cos_l, sin_l)
        lo, end = (lo_g - _SHIFT, end_g - _SHIFT) if is_global[i] else (lo_l - _SHIFT, end_l - _SHIFT)
        y = _norm(h, n1, eps)
        q = apply_rope(_norm(_mm(y, kq, wq).view(1, 1, N, H), qn, eps), cos, sin).transpose(1, 2)
        k = apply_rope(_norm(_mm(y, kk_, wk).view(1, 1, K, H), kn, eps), cos, sin).transpose(1, 2)
        v = _mm(y, kv, wv).view(1, 1, K, H).transpose(1, 2)
        ks[i][:, :, end:end + 1] = k
        vs[i][:, :, end:end + 1] = v
        kk, vv = ks[i][0, :, lo:end + 1], vs[i][0, :, lo:end + 1]  # (K, T, H)
        # grouped_matmul's products as plain bmm: matmul's folding of 4-d operands guards on
        # sizes (T * H != 1024, say), and a real cache soon fails such a guard
        scores = torch.bmm(q.reshape(K, N // K, H).float(), kk.transpose(1, 2).float()).to(q.dtype) * scale
        pattern = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)  # (K, N/K, T)
        z = torch.bmm(pattern.float(), vv.float()).to(q.dtype)  # (K, N/K, H): query heads in order
        h = h + _norm(_mm(z.reshape(1, 1, N * H), ko, wo), n2, eps)
        y = _norm(h, n3, eps)
        h = h + _norm(_mm(F.gelu(_mm(y, kg, wg), approximate="tanh") * _mm(y, ku, wu), kd, wd), n4, eps)
    h = _norm(h, final_w, eps)
    if head is None:
        return h
    logits = soft_cap(_mm(h, floats, (head,)), cap).view(-1).float()
    # what the step record and a greedy choice read off all 262,144 logits, in the same two
    # fused passes here rather than as separate eager ops after the graph (0.5 ms a token)
    return logits, torch.logsumexp(logits, -1), torch.argmax(logits)
