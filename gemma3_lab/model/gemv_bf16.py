"""A bfloat16 row times a bfloat16 weight in a few lines of C (`gemv_bf16.c`), for the one-row
products of a bfloat16 decode step on CPUs with AVX512-BF16.

Why not oneDNN, which torch already carries: on a CPU with AMX, oneDNN runs a one-row
bfloat16 product on its AMX kernel. Measured on a 2-core Xeon (AVX10.1, AMX) inside a decode
step, whose products alternate with other work, the 127 products took 50-59 ms a token; the
same products capped at oneDNN's AVX-512 kernels 36 ms; this loop about 25 ms (the head 14.5
ms at 23 GB/s; the 126 projections 10-11 ms, about 20 GB/s, timed alone). Capping oneDNN for
the whole process is no way out: a 512-token bfloat16 prefill took 2.3 s on the AVX-512
kernels against 0.4 s on AMX. Several rows (a prefill, a batch) keep oneDNN (`kernels`).

The C is built once per machine with the system's C compiler (the compiled decode step needs
one too) into gemma3_lab's cache folder, linked against the OpenMP runtime torch has loaded
(one thread pool for both), and checked against exact arithmetic once per process before
use. Where the CPU lacks AVX512-BF16 (or torch is held to AVX2 by ATEN_CPU_CAPABILITY), no
compiler is found, the build fails, GEMMA3_LAB_PLAIN_KERNELS=1 or GEMMA3_LAB_BF16_GEMV=0,
`available()` is False, `why_not()` says why, and the products take oneDNN as before.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import threading
from pathlib import Path

import torch
from torch import Tensor

from gemma3_lab.config.paths import cache_root

SOURCE = Path(__file__).with_name("gemv_bf16.c")
FLAGS = ["-O3", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512bf16", "-fopenmp", "-shared", "-fPIC"]
ENV = "GEMMA3_LAB_BF16_GEMV"  # "0": never use it
PLAIN = "GEMMA3_LAB_PLAIN_KERNELS"  # kernels.FORCE_PLAIN (which imports this module): "1", every product plain
_STATE: dict[str, object] = {}  # "lib": the loaded function, or "why": the reason it is not used
_LOCK = threading.Lock()


def available() -> bool:
    """Can one-row bfloat16 products take the C loop here? (Built and checked on first ask.)"""
    return why_not() is None


def why_not() -> str | None:
    """Why the loop is not used (None: it is)."""
    if os.environ.get(ENV) == "0":
        return f"{ENV}=0"
    if os.environ.get(PLAIN) == "1":
        return f"{PLAIN}=1"
    return None if _load() is not None else _STATE.get("why")


def gemv(x: Tensor, weight: Tensor) -> Tensor:
    """x (1, K) @ weight (N, K).T, both bfloat16 on the CPU, as (1, N) bfloat16. The caller has
    checked `available()`."""
    if not x.is_contiguous():
        x = x.contiguous()
    if not weight.is_contiguous():
        weight = weight.contiguous()
    N, K = weight.shape
    out = torch.empty(1, N, dtype=torch.bfloat16)
    _STATE["lib"](weight.data_ptr(), x.data_ptr(), out.data_ptr(), N, K)  # the GIL is let go meanwhile
    return out


def _cpu_has_bf16() -> bool:
    cap = torch.backends.cpu.get_cpu_capability()  # AVX2 where ATEN_CPU_CAPABILITY=avx2 holds torch back
    if not (cap.startswith("AVX512") or cap.startswith("AMX")):
        return False
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "")
    except OSError:  # not Linux: no way to ask without risking an illegal instruction
        return False
    return "avx512_bf16" in flags.split()


def _load():
    if "lib" in _STATE or "why" in _STATE:
        return _STATE.get("lib")
    with _LOCK:
        if "lib" not in _STATE and "why" not in _STATE:
            try:
                _STATE["lib"] = _build_and_check()
            except _NotHere as e:
                _STATE["why"] = str(e)
    return _STATE.get("lib")


class _NotHere(Exception):
    pass


def _build_and_check():
    if not _cpu_has_bf16():
        raise _NotHere("the CPU has no AVX512-BF16 (or torch is held below AVX-512)")
    cc = next((c for c in (os.environ.get("CC"), "gcc", "cc") if c and shutil.which(c)), None)
    if cc is None:
        raise _NotHere("no C compiler (gcc or cc) on this machine")
    source = SOURCE.read_bytes()
    tag = hashlib.sha256(source + " ".join([cc, *FLAGS]).encode()).hexdigest()[:16]
    lib_path = cache_root() / "kernels" / f"gemv_bf16-{tag}.so"
    if not lib_path.is_file():
        lib_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = lib_path.with_name(f"{lib_path.stem}.{os.getpid()}.{threading.get_ident()}.tmp")
        done = subprocess.run([cc, *FLAGS, str(SOURCE), "-o", str(tmp)], capture_output=True, text=True)
        if done.returncode != 0:
            tmp.unlink(missing_ok=True)
            first = (done.stderr.strip().splitlines() or ["no message"])[0]
            raise _NotHere(f"{cc} could not build {SOURCE.name}: {first[:200]}")
        os.replace(tmp, lib_path)  # whole or not at all, whoever builds it at the same time
    fn = ctypes.CDLL(str(lib_path)).gemv_bf16
    fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64]
    fn.restype = None
    _check(fn)
    return fn


def _check(fn) -> None:
    """The built loop against exact (float64) arithmetic, on a shape with a ragged end in both
    dimensions: every output within one bfloat16 rounding of the dot product, give or take the
    float32 sum's own rounding."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(203, 700, generator=g).bfloat16()
    x = torch.randn(1, 700, generator=g).bfloat16()
    out = torch.empty(1, 203, dtype=torch.bfloat16)
    fn(w.data_ptr(), x.data_ptr(), out.data_ptr(), 203, 700)
    exact = x.double() @ w.double().T
    if not torch.allclose(out.double(), exact, rtol=2 ** -7, atol=1e-3):
        raise _NotHere("the built loop disagreed with exact arithmetic on this CPU")
