"""The lean float32 decode step compiled by `torch.compile` (Inductor, C++ built with the
machine's gcc): one graph over tensors for the whole step, so the ~40 small ops of each
layer between its matmuls (norms, q/k norms, RoPE, cache writes, softmax, residuals) run as
a few fused loops instead of one dispatch each from Python.

Why float32 on the CPU only: on a 2-core Xeon (AVX-512-BF16, AMX) the compiled step took
40 ms against 47 ms for the eager lean step, while a compiled bfloat16 step took 41 ms
against 34 ms eager (Inductor's bfloat16 loops and an opaque packed matmul lose there);
bfloat16 and the low-bit modes keep the eager lean step (`fast_decode`).

Compiling costs about half a minute on two cores, once per process and model shape: the
graph is traced with dynamic shapes, so one graph serves every cache length and buffer
size. Nothing waits for it: `start` compiles in a background thread (on throwaway buffers)
and `step` returns None until the graph is ready, so a decode step falls back to the eager
lean step meanwhile, and for good if the compiler is missing or fails (`status` says why).

The step reads and writes the caches' own buffers (`LayerCache`), so a generation can
switch between this step, the eager lean step and the plain forward at any token.
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
from gemma3_lab.model.kv_cache import KVCache
from gemma3_lab.model.norm import fused_rms_norm
from gemma3_lab.model.rope import apply_rope, rope_tables

# Dynamo specialises an int argument that is 0 or 1 (a later 2 would recompile, half a
# minute): slot bounds enter the graph shifted up by this much and are shifted back inside.
_SHIFT = 2


@dataclass(frozen=True)
class CompileStatus:
    """Where the compiled step of one model stands."""

    state: str  # "off" (never asked) | "compiling" | "ready" | "failed" | "unavailable"
    seconds: float | None = None  # compile time, once ready or failed
    reason: str = ""  # why failed / unavailable

    def describe(self) -> str:
        if self.state == "ready":
            return f"compiled float32 decode step ready (compiled in {self.seconds:.0f} s)"
        if self.state == "compiling":
            return "compiling the float32 decode step in the background (the eager lean step runs meanwhile)"
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
    if w.dtype != torch.float32:
        return (f"the model is {str(w.dtype).removeprefix('torch.')}; only float32 is compiled (a compiled "
                "bfloat16 step measured slower than the eager one)")
    if net.vision is not None:
        return "multimodal models decode with the eager lean step"
    head = net.embed if net.lm_head is None else net.lm_head
    for m in (head, *(p for b in net.blocks for p in _projections(b))):
        weight = m._parameters.get("weight")
        if getattr(m, "decode_forward", None) is not None or weight is None or weight.dtype != torch.float32:
            return "quantized weights bring their own packed kernels (the eager lean step)"
    return None


def start(net, background: bool = True, announce: Callable[[CompileStatus], None] | None = None) -> CompileStatus:
    """Compile the step for this model (once): in a background thread, or here and now with
    background=False. Returns the status at once; `status(net)` follows it, and `announce`
    (if given) is called with the final status when the compile ends."""
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
    w = net.embed.weight
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
        # a guard that fails here would recompile for half a minute in the middle of a
        # generation: refuse instead, and let the eager lean step take this token
        with torch.compiler.set_stance("fail_on_recompile"):
            return _run(net, token_id, cache, owners)
    except Exception:  # noqa: BLE001 - the cache is untouched until a step succeeds
        return None


def _projections(b):
    a, m = b.attn, b.mlp
    return a.q_proj, a.k_proj, a.v_proj, a.o_proj, m.gate_proj, m.up_proj, m.down_proj


def _owners(net) -> tuple[list[tuple], tuple]:
    """The modules whose weights a step passes, per block in `_step_graph`'s order, then the
    final norm and the head. Their weights are read afresh every step (an edit or a new
    Parameter is seen); the list of modules is made once per generation."""
    blocks = [(b.pre_attention_norm, *_projections(b), b.attn.q_norm, b.attn.k_norm, b.post_attention_norm,
               b.pre_ffw_norm, b.post_ffw_norm) for b in net.blocks]
    return blocks, (net.final_norm, net.embed if net.lm_head is None else net.lm_head)


def _run(net, token_id: int, cache: KVCache, owners: tuple[list[tuple], tuple]) -> Tensor:
    cfg = net.config.text
    positions = cache.next_position[:, None]  # (1, 1)
    h = net._embed(torch.tensor([[token_id]]), None)
    is_global = tuple(t is AttentionType.GLOBAL for t in cfg.layer_types)
    cos_l, sin_l = rope_tables(positions, net.inv_freq_local, h.dtype)
    cos_g, sin_g = rope_tables(positions, net.inv_freq_global, h.dtype)
    # every layer of a type has the same kept slots (one prefill, the same steps since)
    like = h.new_empty(1, cfg.num_kv_heads, 1, cfg.head_dim)
    bounds = {}
    for lc, g in zip(cache.layers, is_global):
        lc._make_room(like, 1)
        span = (lc._start, lc._end)
        if bounds.setdefault(g, span) != span:
            raise RuntimeError("layers of one type disagree on their kept slots")
    lo_l, end_l = bounds.get(False, (0, 0))
    lo_g, end_g = bounds.get(True, (0, 0))
    blocks, (final, head) = owners
    # `_parameters` directly: nn.Module.__getattr__ for 236 weights cost 0.3 ms a step
    weights = [[m._parameters["weight"] for m in row] for row in blocks]
    a0 = net.blocks[0].attn
    logits = _graph()(h, cos_l, sin_l, cos_g, sin_g, weights, [lc._k for lc in cache.layers],
                      [lc._v for lc in cache.layers], lo_l + _SHIFT, end_l + _SHIFT, lo_g + _SHIFT, end_g + _SHIFT,
                      final._parameters["weight"], head._parameters["weight"], is_global, a0.n_heads, a0.n_kv, a0.head_dim, a0.scale,
                      cfg.rms_norm_eps)
    for lc in cache.layers:  # what LayerCache.update does after its write of one slot
        lc._end += 1
        if lc.keep is not None:
            lc._start = max(lc._start, lc._end - lc.keep)
    cache.advance(1, None, None, positions)
    return net.softcap(logits)[0, -1].float()


def _norm(x: Tensor, w: Tensor, eps: float) -> Tensor:
    return fused_rms_norm(x, 1.0 + w.float(), eps)  # (1 + w) inside the graph: weights come in raw


def _step_graph(h, cos_l, sin_l, cos_g, sin_g, weights, ks, vs, lo_l, end_l, lo_g, end_g, final_w, head,
                is_global, N: int, K: int, H: int, scale: float, eps: float):
    """The lean step (`fast_decode._block`, `_attention`) over tensors: h (1, 1, D) the new
    token's embedding; each layer writes its key/value at slot `end` of its buffers and
    attends over slots lo..end. Returns (1, 1, V) logits before the softcap."""
    for i, (n1, wq, wk, wv, wo, wg, wu, wd, qn, kn, n2, n3, n4) in enumerate(weights):
        cos, sin = (cos_g, sin_g) if is_global[i] else (cos_l, sin_l)
        lo, end = (lo_g - _SHIFT, end_g - _SHIFT) if is_global[i] else (lo_l - _SHIFT, end_l - _SHIFT)
        y = _norm(h, n1, eps)
        q = apply_rope(_norm(F.linear(y, wq).view(1, 1, N, H), qn, eps), cos, sin).transpose(1, 2)
        k = apply_rope(_norm(F.linear(y, wk).view(1, 1, K, H), kn, eps), cos, sin).transpose(1, 2)
        v = F.linear(y, wv).view(1, 1, K, H).transpose(1, 2)
        ks[i][:, :, end:end + 1] = k
        vs[i][:, :, end:end + 1] = v
        kk, vv = ks[i][0, :, lo:end + 1], vs[i][0, :, lo:end + 1]  # (K, T, H)
        # grouped_matmul's products as plain bmm: matmul's folding of 4-d operands guards on
        # sizes (T * H != 1024, say), and a real cache soon fails such a guard
        scores = torch.bmm(q.reshape(K, N // K, H), kk.transpose(1, 2)) * scale  # (K, N/K, T)
        pattern = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
        z = torch.bmm(pattern, vv)  # (K, N/K, H): query heads in order, as grouped_matmul's
        h = h + _norm(F.linear(z.reshape(1, 1, N * H), wo), n2, eps)
        y = _norm(h, n3, eps)
        h = h + _norm(F.linear(F.gelu(F.linear(y, wg), approximate="tanh") * F.linear(y, wu), wd), n4, eps)
    return F.linear(_norm(h, final_w, eps), head)
