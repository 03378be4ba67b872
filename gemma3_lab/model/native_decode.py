"""The whole decode step of one token in one C call (`step.c`), for float32 models where the
CPU has AVX-512, or AVX2 and FMA (their projections float32, or int8/int4 codes:
`loading.lowbit`), and bfloat16 ones on the same CPUs: the step that `generate` takes
there by default, before the compiled one (`compiled_decode`), with nothing to compile.

Two builds of one source (`simd.h` gives step.c its vector operations): AVX-512 in 16 lanes,
and `step_avx2.c` in 8 lanes with gemv.c's AVX2 loops (float32, and bfloat16 weights widened to
float32 as they are read), for CPUs without AVX-512 or without AVX512-BF16. `isa(dtype)` says
which runs here; GEMMA3_LAB_NATIVE_ISA=avx2 takes the AVX2 build on an AVX-512 CPU too, as the tests do.
On the Xeon, in turns, the AVX2 build decoded float32 at 21-26 tok/s against 26-29 for the
AVX-512 one, bfloat16 at 47-50 against 48-50, int8 at 51-66 against 75 and int4 at 60-68
against 67-70.

Why: a float32 step of the 270M reads 1.07 GB of weights in 127 products. On a 2-core Xeon
(AVX10.1, AMX) the products called back to back from C took 44-48 ms, at the head's own rate,
but the compiled step took 57-60 ms: each product called from the graph cost up to 45 us more,
and the graph's other work about 5 ms. Here the products run back to back, with the small ops
between them (norms, RoPE, the cache write, one query's attention, gelu) as plain C loops on
activations of a few thousand floats. bench/bench_core.py prints today's numbers.

What it computes: the eager lean step's arithmetic (`fast_decode`), in the same order, with
the same products (the C loops of `gemv`, as `kernels` takes for one row). Float32 elementwise
ops round as torch's do; the sums inside a norm, a score and a softmax are reordered, and
exp and tanh are a vector polynomial instead of torch's: float32 logits agree with the plain
path's to ~1e-6 of their scale and greedy tokens are the same (tests). In a bfloat16 model the
activations are rounded to bfloat16 wherever the eager step holds a bfloat16 tensor.

Quantized projections (float32 models): int8 per row and int4 in groups are read from their
codes by C loops of their own, with float32 activations and float32 lo and step: the plain
forward's arithmetic on the dequantized weights, reordered (the packed kernels of the eager
and compiled steps round activations to bfloat16 on the way in). A quantized table's row is
looked up by torch before the call, and a quantized head (the int4 screen, `ScreenedHead`) runs
after it on the final hidden state. On the Xeon, load's int8 default decoded at 49-57 tok/s
and its int4 default at 46-48, against 19-21 for float32 in turns (int4's loop does more work a
byte than int8's).

It applies where every projection is a float weight of the model's dtype or, in a float32
model, int8/int4 codes in a layout the loops read; one to `gemv.MAX_ROWS` rows (the app's two
columns decode as one batch: float32 weights are read once for both, each row with the bits it
has alone), no vision tower, and `fast_decode.applies` (nothing hooked).
The step reads and writes the caches' own buffers (`LayerCache`), so a generation can switch
between this step, the compiled one, the eager one and the plain forward at any token.
GEMMA3_LAB_NATIVE_STEP=0 turns it off; `why_not(net)` says why it does not apply.
"""

from __future__ import annotations

import ctypes
import os

import torch
from torch import Tensor

from gemma3_lab.model import gemv, kernels
from gemma3_lab.model.kv_cache import KVCache
from gemma3_lab.model.network import embed_scale
from gemma3_lab.model.norm import decode_gain
from gemma3_lab.model.rope import rope_tables

ENV = "GEMMA3_LAB_NATIVE_STEP"  # "0": never take it
ISA_ENV = "GEMMA3_LAB_NATIVE_ISA"  # "avx2": the AVX2 build even where AVX-512 is there (how tests reach it)


class Step(ctypes.Structure):
    """step.c's `Step`, field for field (every field 8 bytes wide)."""

    _fields_ = ([(n, ctypes.c_int64) for n in ("layers", "D", "N", "K", "H", "F", "V", "bf16", "rows", "slots_max")]
                + [(n, ctypes.c_double) for n in ("eps", "scale", "emb_scale", "softcap")]
                + [(n, ctypes.c_void_p) for n in ("table", "head", "final_gain", "proj", "gain", "kc", "vc", "slots",
                                                  "lo", "end", "rope", "kinds", "groups", "qlo", "qstep", "tokens", "first",
                                                  "work", "logits", "lse", "argmax")])


_FUNCS: dict[str, dict[str, object]] = {}


def _funcs(isa: str) -> dict[str, object]:
    """step_run and step_work of one build of step.c ("avx512", or "avx2": step_avx2.c) from
    the C library `gemv` builds (found there once, after `gemv` said it is built), or
    {"why": ...} where the library's `Step` is not this file's (another version of step.c)."""
    if isa not in _FUNCS:
        lib, tail = gemv.library(), "_avx2" if isa == "avx2" else ""
        run, work, size = (getattr(lib, f"step_{n}{tail}") for n in ("run", "work", "size"))
        run.argtypes, run.restype = [ctypes.POINTER(Step)], None
        work.argtypes, work.restype = [ctypes.POINTER(Step)], ctypes.c_int64
        size.argtypes, size.restype = [], ctypes.c_int64
        if size() != ctypes.sizeof(Step):
            _FUNCS[isa] = {"why": f"step.c's Step has {size()} bytes and native_decode.Step {ctypes.sizeof(Step)}"}
        else:
            _FUNCS[isa] = {"run": run, "work": work}
    return _FUNCS[isa]


def isa(dtype: torch.dtype) -> tuple[str | None, str | None]:
    """(which build of the step runs `dtype` weights here, why none does): "avx512" where
    `gemv` has its AVX-512 loop for them (AVX512-BF16 for bfloat16), else "avx2" where the CPU
    has AVX2 and FMA (or GEMMA3_LAB_NATIVE_ISA=avx2 asks for it)."""
    name = str(dtype).removeprefix("torch.")
    if os.environ.get(ISA_ENV) == "avx2":
        return ("avx2", None) if gemv.avx2_available(dtype) else (None, f"no AVX2 loop here: {gemv.avx2_why_not(dtype)}")
    if gemv.available(dtype):
        return "avx512", None
    if gemv.avx2_available(dtype):
        return "avx2", None
    return None, f"no C loop for {name} products here: {gemv.why_not(dtype)}"


def _float_weight(m, dtype: torch.dtype) -> Tensor | None:
    """The module's plain weight where it is one of `dtype` this step can read in place."""
    if getattr(m, "decode_operands", None) is not None or getattr(m, "decode_forward", None) is not None:
        return None  # quantized
    w = m._parameters.get("weight")  # not `.weight`: a quantized table's would build the float table
    ok = w is not None and w.dtype == dtype and w.dim() == 2 and w.is_contiguous() and w.device.type == "cpu"
    return w if ok else None


def _quantized(m) -> tuple[int, Tensor, Tensor, Tensor, int] | None:
    """(bits, codes, lo, step, group) of a quantized projection whose codes the C loops read:
    int8 per row, or int4 in groups of a multiple of 16 columns that tile each half of a row
    (the two halves share a byte); float32 lo and step."""
    q, lo, st = (getattr(m, n, None) for n in ("qweight", "lo", "step"))
    if getattr(m, "decode_operands", None) is None or q is None or lo is None:
        return None
    K = m.in_features
    G = K // lo.shape[1]
    fits = (lo.dtype == st.dtype == torch.float32 and q.is_contiguous() and lo.is_contiguous()
            and st.is_contiguous() and q.device.type == "cpu" and K % 32 == 0)
    if fits and m.bits == 8 and G == K and q.dtype == torch.int8:
        return 8, q, lo, st, G
    if fits and m.bits == 4 and G % 16 == 0 and (K // 2) % G == 0 and q.dtype == torch.uint8:
        return 4, q, lo, st, G
    return None


def why_not(net) -> str | None:
    """Why this model's decode steps cannot take the native step (None: they can). Asked at
    each generation's first step: a model may be quantized or moved between generations."""
    if os.environ.get(ENV) == "0":
        return f"{ENV}=0"
    w = net.final_norm.weight
    if w.device.type != "cpu":
        return f"the model is on {w.device.type}"
    if w.dtype not in (torch.float32, torch.bfloat16):
        return f"the model is {str(w.dtype).removeprefix('torch.')}; the native step is float32 or bfloat16"
    built, why = isa(w.dtype)
    if built is None:
        return why
    if "why" in _funcs(built):
        return _funcs(built)["why"]
    if net.vision is not None:
        return "multimodal models decode with the compiled or eager step"
    head = net.embed if net.lm_head is None else net.lm_head
    name = str(w.dtype).removeprefix('torch.')
    if w.dtype == torch.bfloat16:
        if any(_float_weight(m, w.dtype) is None for b in net.blocks for m in b.projections()) or \
                _float_weight(head, w.dtype) is None or _float_weight(net.embed, w.dtype) is None:
            return "a bfloat16 model with a quantized or non-bfloat16 product or embedding"
    else:  # float32, int8 per row or int4 in groups; a quantized head or table runs in torch
        if any(_float_weight(m, w.dtype) is None and _quantized(m) is None for b in net.blocks for m in b.projections()):
            return "a projection is neither float32 nor int8/int4 in a layout the C loops read"
        if getattr(head, "decode_forward", None) is None and _float_weight(head, w.dtype) is None:
            return f"the head is neither {name} nor quantized"
    a = net.blocks[0].attn
    if a.n_heads % a.n_kv or a.head_dim % 2:
        return "the attention's shape is not one the native step takes"
    return None


class _Plan:
    """What a generation's steps pass the C step and keep alive: made at its first step (the
    modules do not change under a generation); the cache's buffers, slots and this position's
    RoPE tables are filled in at every step."""

    def __init__(self, net) -> None:
        cfg, a0 = net.config.text, net.blocks[0].attn
        self.dtype = net.final_norm.weight.dtype
        self.isa = isa(self.dtype)[0]
        head = net.embed if net.lm_head is None else net.lm_head
        # a quantized table (its rows looked up by torch before the call) or head (run by torch after it)
        self.table, self.head = _float_weight(net.embed, self.dtype), _float_weight(head, self.dtype)
        projections = [m for b in net.blocks for m in b.projections()]
        stored = [_float_weight(m, self.dtype) for m in projections]
        stored = [_quantized(m) if w is None else w for w, m in zip(stored, projections)]
        weights = [t if isinstance(t, Tensor) else t[1] for t in stored]
        self.quant = [(0, None, None, 0) if isinstance(t, Tensor) else (t[0], t[2], t[3], t[4]) for t in stored]
        self.kinds = torch.tensor([b for b, *_ in self.quant], dtype=torch.int64)
        self.groups = torch.tensor([g for *_, g in self.quant], dtype=torch.int64)
        self.qlo = torch.tensor([0 if lo is None else lo.data_ptr() for _, lo, _, _ in self.quant], dtype=torch.int64)
        self.qstep = torch.tensor([0 if st is None else st.data_ptr() for _, _, st, _ in self.quant], dtype=torch.int64)
        self.gains = [decode_gain(n) for b in net.blocks for n in b.norms()]
        self.final_gain = decode_gain(net.final_norm)
        self.proj = torch.tensor([t.data_ptr() for t in weights], dtype=torch.int64)
        self.gain = torch.tensor([t.data_ptr() for t in self.gains], dtype=torch.int64)
        L = cfg.num_layers
        self.is_global = [t.short == "global" for t in cfg.layer_types]
        self.freqs = (net.inv_freq_local, net.inv_freq_global)
        self.lo, self.end, self.slots = (ctypes.c_int64 * L)(), (ctypes.c_int64 * L)(), (ctypes.c_int64 * L)()
        self.kc, self.vc, self.rope = (ctypes.c_void_p * L)(), (ctypes.c_void_p * L)(), (ctypes.c_void_p * L)()
        self.work = torch.empty(0)
        s = self.step = Step()
        s.layers, s.D, s.N, s.K, s.H = L, cfg.hidden_size, a0.n_heads, a0.n_kv, a0.head_dim
        s.F, s.V, s.bf16 = cfg.intermediate_size, cfg.vocab_size, int(self.dtype == torch.bfloat16)
        s.eps, s.scale = cfg.rms_norm_eps, a0.scale
        s.emb_scale = float(embed_scale(cfg, self.dtype))
        s.softcap = net.final_softcap or 0.0
        s.table = None if self.table is None else self.table.data_ptr()
        s.head = None if self.head is None else self.head.data_ptr()
        s.final_gain, s.proj, s.gain = self.final_gain.data_ptr(), self.proj.data_ptr(), self.gain.data_ptr()
        s.kinds, s.groups = self.kinds.data_ptr(), self.groups.data_ptr()
        s.qlo, s.qstep = self.qlo.data_ptr(), self.qstep.data_ptr()
        for name in ("kc", "vc", "slots", "lo", "end", "rope"):
            setattr(s, name, ctypes.cast(getattr(self, name), ctypes.c_void_p))


def _buffers_fit(cache: KVCache, dtype: torch.dtype, rows: int) -> bool:
    return all(lc._k is not None and lc._k.dtype == dtype and lc._k.shape[0] == rows and lc._k.is_contiguous()
               and lc._v.is_contiguous() for lc in cache.layers)


@torch.no_grad()
def step(net, token_id: int | list[int], cache: KVCache) -> Tensor | None:
    """(V,) float32 logits for the token after `token_id`, appended at the cache's next slot;
    for a list of ids, one per row of the cache (up to `gemv.MAX_ROWS` rows decoding together,
    as the app's two columns do), (B, V), each row with the bits it would have alone. None
    (nothing done) where the native step does not apply (the caller has already checked that a
    lean step does: `fast_decode.applies`)."""
    ids = [token_id] if isinstance(token_id, int) else list(token_id)
    if "native" not in cache.plan:
        cache.plan["native"] = None if why_not(net) else _Plan(net)
    plan: _Plan | None = cache.plan["native"]
    M = len(ids)
    if plan is None or not 1 <= M <= gemv.MAX_ROWS or cache.next_position.shape[0] != M or \
            not _buffers_fit(cache, plan.dtype, M):
        return None
    s = plan.step
    like = plan.final_gain.new_empty(M, s.K, 1, s.H, dtype=plan.dtype)
    positions = cache.next_position[:, None]  # (M, 1)
    # (M, 2, H) per layer type: each row's cos, then its sin
    tables = [torch.stack(rope_tables(positions, f, plan.dtype), 1).float().contiguous() for f in plan.freqs]
    for i, lc in enumerate(cache.layers):
        lc._make_room(like, 1)
        plan.lo[i], plan.end[i], plan.slots[i] = lc._start, lc._end, lc._k.shape[2]
        plan.kc[i], plan.vc[i] = lc._k.data_ptr(), lc._v.data_ptr()
        plan.rope[i] = tables[plan.is_global[i]].data_ptr()
    tokens = torch.tensor(ids, dtype=torch.int64)
    s.rows, s.slots_max, s.tokens = M, max(plan.slots), tokens.data_ptr()
    first = None if plan.table is not None else net._embed(tokens[:, None], None).float().contiguous()
    s.first = None if first is None else first.data_ptr()
    funcs = _funcs(plan.isa)
    need = funcs["work"](ctypes.byref(s))
    if plan.work.numel() < need:
        plan.work = torch.empty(need)
        s.work = plan.work.data_ptr()
    # fresh outputs each step: a generation keeps the logits it was given
    out = torch.empty(M, s.V if plan.head is not None else s.D)
    lse, argmax = torch.empty(M), torch.empty(M, dtype=torch.int64)
    s.logits, s.lse, s.argmax = out.data_ptr(), lse.data_ptr(), argmax.data_ptr()
    funcs["run"](ctypes.byref(s))  # the GIL is let go meanwhile
    for lc in cache.layers:  # what LayerCache.update does after its write of one slot
        lc._end += 1
        if lc.keep is not None:
            lc._start = max(lc._start, lc._end - lc.keep)
    cache.advance(1, None, None, positions)
    cache.plan["summary"] = None
    if plan.head is None:  # a quantized head: its own kernels on the final hidden states left in `out`
        out = net.softcap(kernels.linear(out.view(M, 1, s.D), net.lm_head))[:, -1].float()
    if not isinstance(token_id, int):
        return out
    row = out[0]
    if plan.head is not None:
        cache.plan["summary"] = (row, lse[0], argmax[0])  # read by `compiled_decode.summary`
    return row
