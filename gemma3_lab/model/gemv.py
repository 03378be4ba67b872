"""One row times a weight in a few lines of C (`gemv.c`), for the one-row products of a decode
step: bfloat16 on CPUs with AVX512-BF16, float32 on CPUs with AVX-512.

bfloat16, why not oneDNN, which torch already carries: on a CPU with AMX, oneDNN runs a
one-row bfloat16 product on its AMX kernel. Measured on a 2-core Xeon (AVX10.1, AMX) inside a
decode step, whose products alternate with other work, the 127 products took 50-59 ms a
token; the same products capped at oneDNN's AVX-512 kernels 36 ms; this loop about 25 ms (the
head 14.5 ms at 23 GB/s; the 126 projections 10-11 ms, about 20 GB/s, timed alone). Capping
oneDNN for the whole process is no way out: a 512-token bfloat16 prefill took 2.3 s on the
AVX-512 kernels against 0.4 s on AMX. Several rows (a prefill, a batch) keep oneDNN (`kernels`).

float32, why not MKL's sgemv: on the same Xeon the loop read the 262k x 640 head at 25-28
GB/s against MKL's 22-23, and the 126 projections (distinct weights, 0.4 GB) in 16-17.5 ms
against 18-20; a float32 decode step went from 10.6 to 11.7 tokens/s eager. Every output is
one thread's dot product in one fixed order, so its bits do not depend on the thread count:
the plain forward and the decode steps, which all take it for one row (`kernels.rows_times`),
agree to the bit. Up to MAX_ROWS rows (a batch decoding together, as the app's two columns
do) are read against each weight row once, each output summed as for one row: each row of
the batch has the bits of that row alone. More rows keep MKL.

The C is built once per machine with the system's C compiler (the compiled decode step needs
one too) into gemma3_lab's cache folder, in one library with `step.c` (the native decode step,
`native_decode`, which calls these loops), linked against the OpenMP runtime torch has loaded
(one thread pool for both), and each loop is checked against exact arithmetic once per
process before use. Where the CPU lacks the instructions (or torch is held below AVX-512 by
ATEN_CPU_CAPABILITY), no compiler is found, the build fails, GEMMA3_LAB_PLAIN_KERNELS=1, or
GEMMA3_LAB_BF16_GEMV=0 / GEMMA3_LAB_F32_GEMV=0, `available(dtype)` is False, `why_not(dtype)`
says why, and the products take oneDNN or MKL as before.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import threading
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from gemma3_lab.config.paths import cache_root

# gemv.c's loops, and step.c's whole decode step (`native_decode`) that calls them
SOURCES = [Path(__file__).with_name(n) for n in ("gemv.c", "step.c", "step_avx2.c")]
HEADERS = [Path(__file__).with_name(n) for n in ("bfloat16.h", "simd.h")]
# the instructions are named per function in the C; no multiply-add fused unless written
FLAGS = ["-O3", "-fopenmp", "-shared", "-fPIC", "-ffp-contract=off"]
PLAIN = "GEMMA3_LAB_PLAIN_KERNELS"  # kernels.FORCE_PLAIN (which imports this module): "1", every product plain


MAX_ROWS = 4  # float32: up to this many rows of x in one read of the weight (MAX_M in the C)


@dataclass(frozen=True)
class Loop:
    symbol: str  # the C function: (W, x, y, M, N, K)
    rows: int  # the most rows of x it takes
    env: str  # "0" there: never use it
    flag: str  # the /proc/cpuinfo flag it needs
    needs: str  # that flag in words, for why_not
    also: tuple[str, ...] = ()  # more flags it needs


LOOPS = {
    torch.bfloat16: Loop("gemv_bf16", 1, "GEMMA3_LAB_BF16_GEMV", "avx512_bf16", "AVX512-BF16"),
    torch.float32: Loop("gemv_f32", MAX_ROWS, "GEMMA3_LAB_F32_GEMV", "avx512f", "AVX-512"),
}
# float32 and bfloat16 (widened to float32) in 8 lanes, for the native step on CPUs without
# AVX-512 (or without AVX512-BF16) but with AVX2 and FMA (`avx2_available`)
AVX2_LOOPS = {
    torch.bfloat16: Loop("gemv_bf16_avx2", 1, "GEMMA3_LAB_BF16_GEMV", "avx2", "AVX2 and FMA", ("fma",)),
    torch.float32: Loop("gemv_f32_avx2", MAX_ROWS, "GEMMA3_LAB_F32_GEMV", "avx2", "AVX2 and FMA", ("fma",)),
}
ENV = LOOPS[torch.bfloat16].env
F32_ENV = LOOPS[torch.float32].env
# "lib": the loaded library, or "lib why": why none; per loop, by its symbol: its checked
# function, or (symbol, "why")
_STATE: dict[object, object] = {}
_LOCK = threading.Lock()


def available(dtype: torch.dtype = torch.bfloat16) -> bool:
    """Can one-row products in `dtype` take the C loop here? (Built and checked on first ask.)"""
    return why_not(dtype) is None


def why_not(dtype: torch.dtype = torch.bfloat16) -> str | None:
    """Why the loop for `dtype` is not used (None: it is)."""
    loop = LOOPS.get(dtype)
    return f"no C loop for {dtype}" if loop is None else _why_not(loop, dtype)


def avx2_available(dtype: torch.dtype = torch.float32) -> bool:
    """Is the AVX2 loop for `dtype` (float32 or bfloat16) built and checked here (for
    `native_decode` where the CPU has AVX2 and FMA but not the AVX-512 loop, or where a test
    asks for it)?"""
    return avx2_why_not(dtype) is None


def avx2_why_not(dtype: torch.dtype = torch.float32) -> str | None:
    return _why_not(AVX2_LOOPS[dtype], dtype)


def loop_function(loop: Loop):
    """The checked ctypes function of a loop `_why_not` said yes to."""
    return _STATE[loop.symbol]


def _why_not(loop: Loop, dtype: torch.dtype) -> str | None:
    """Why `loop` (of `dtype` products) is not used (None: it is), switched off or not loaded."""
    if os.environ.get(loop.env) == "0":
        return f"{loop.env}=0"
    if os.environ.get(PLAIN) == "1":
        return f"{PLAIN}=1"
    return None if _load(loop, dtype) is not None else _STATE.get((loop.symbol, "why"))


def gemv(x: Tensor, weight: Tensor) -> Tensor:
    """x (M, K) @ weight (N, K).T, both bfloat16 (M = 1) or both float32 (M <= MAX_ROWS) on the
    CPU, as (M, N) of that dtype. The caller has checked `available(weight.dtype)`."""
    if not x.is_contiguous():
        x = x.contiguous()
    if not weight.is_contiguous():
        weight = weight.contiguous()
    (N, K), M = weight.shape, x.shape[0]
    if M > LOOPS[weight.dtype].rows:
        raise ValueError(f"the {weight.dtype} loop takes at most {LOOPS[weight.dtype].rows} rows, not {M}")
    out = torch.empty(M, N, dtype=weight.dtype)
    _STATE[LOOPS[weight.dtype].symbol](weight.data_ptr(), x.data_ptr(), out.data_ptr(), M, N, K)  # the GIL is let go meanwhile
    return out


def _cpu_has(flag: str, *more: str) -> bool:
    cap = torch.backends.cpu.get_cpu_capability()  # AVX2 where ATEN_CPU_CAPABILITY=avx2 holds torch back
    wide = ("AVX512", "AMX") + (("AVX2",) if flag == "avx2" else ())
    if not cap.startswith(wide):
        return False
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "")
    except OSError:  # not Linux: no way to ask without risking an illegal instruction
        return False
    return all(f in flags.split() for f in (flag, *more))


def _load(loop: Loop, dtype: torch.dtype):
    key = loop.symbol
    if key in _STATE or (key, "why") in _STATE:
        return _STATE.get(key)
    with _LOCK:
        if key not in _STATE and (key, "why") not in _STATE:
            try:
                _STATE[key] = _checked(loop, dtype)
            except _NotHere as e:
                _STATE[(key, "why")] = str(e)
    return _STATE.get(key)


class _NotHere(Exception):
    pass


def _checked(loop: Loop, dtype: torch.dtype):
    if not _cpu_has(loop.flag, *loop.also):
        held = "AVX2" if loop.flag == "avx2" else "AVX-512"
        raise _NotHere(f"the CPU has no {loop.needs} (or torch is held below {held})")
    fn = getattr(_library(), loop.symbol)
    fn.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_int64] * 3
    fn.restype = None
    _check(fn, dtype, loop.rows)
    return fn


def library():
    """The loaded C library, for `native_decode`'s step (after `available` said yes)."""
    return _library()


def _library():
    """The built library, built on the first call (one answer per process, built or why not)."""
    if "lib" not in _STATE and "lib why" not in _STATE:
        try:
            _STATE["lib"] = _build()
        except _NotHere as e:
            _STATE["lib why"] = str(e)
    if "lib why" in _STATE:
        raise _NotHere(_STATE["lib why"])
    return _STATE["lib"]


def _build():
    cc = next((c for c in (os.environ.get("CC"), "gcc", "cc") if c and shutil.which(c)), None)
    if cc is None:
        raise _NotHere("no C compiler (gcc or cc) on this machine")
    source = b"".join(p.read_bytes() for p in SOURCES + HEADERS)
    tag = hashlib.sha256(source + " ".join([cc, *FLAGS]).encode()).hexdigest()[:16]
    lib_path = cache_root() / "kernels" / f"gemv-{tag}.so"
    if not lib_path.is_file():
        lib_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = lib_path.with_name(f"{lib_path.stem}.{os.getpid()}.{threading.get_ident()}.tmp")
        done = subprocess.run([cc, *FLAGS, *map(str, SOURCES), "-o", str(tmp), "-lm"], capture_output=True, text=True)
        if done.returncode != 0:
            tmp.unlink(missing_ok=True)
            lines = done.stderr.strip().splitlines() or ["no message"]
            first = next((ln for ln in lines if "error" in ln), lines[0])  # gcc's first line may be "In function ..."
            raise _NotHere(f"{cc} could not build {' '.join(p.name for p in SOURCES)}: {first[:200]}")
        os.replace(tmp, lib_path)  # whole or not at all, whoever builds it at the same time
    return ctypes.CDLL(str(lib_path))


def _check(fn, dtype: torch.dtype, M: int) -> None:
    """The built loop against exact (float64) arithmetic, on a shape with a ragged end in both
    dimensions: every output within one rounding of the dot product (bfloat16's, or the
    float32 sum's own)."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(203, 700, generator=g).to(dtype)
    x = torch.randn(M, 700, generator=g).to(dtype)
    out = torch.empty(M, 203, dtype=dtype)
    fn(w.data_ptr(), x.data_ptr(), out.data_ptr(), M, 203, 700)
    exact = x.double() @ w.double().T
    rtol, atol = (2 ** -7, 1e-3) if dtype == torch.bfloat16 else (1e-5, 1e-4)
    if not torch.allclose(out.double(), exact, rtol=rtol, atol=atol):
        raise _NotHere("the built loop disagreed with exact arithmetic on this CPU")
