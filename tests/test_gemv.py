"""The C gemvs (`gemv`) for one-row decode products. bfloat16: within one bfloat16 rounding of
exact arithmetic on ragged shapes, equal to oneDNN's product within rounding. float32: within
float32 summation error of exact, the same bits whatever the thread count, taken by
`rows_times` (so by the plain forward and every decode step alike). Both: built once into the
cache folder, and honest about why they are not used where the CPU (or torch's held-back
ISA), the compiler or the user says no; a CPU without them (forced here with
ATEN_CPU_CAPABILITY=avx2) takes oneDNN, MKL or F.linear instead."""

from __future__ import annotations

import gc
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gemma3_lab.model import gemv, kernels

HERE = gemv.available()  # this CPU has AVX512-BF16 and a compiler: the bfloat16 loop itself is tested
HERE32 = gemv.available(torch.float32)  # AVX-512 and a compiler: the float32 loop


def _within_a_rounding(got: torch.Tensor, x: torch.Tensor, w: torch.Tensor) -> None:
    """The float32 sum of exact bfloat16 products, in any order (at most K roundings of
    2^-24 of the sum of magnitudes), then one rounding to bfloat16 (2^-8 of the value)."""
    exact = x.double() @ w.double().T
    bound = exact.abs() * 2 ** -8 + (x.double().abs() @ w.double().abs().T) * x.shape[-1] * 2 ** -24
    assert got.dtype == torch.bfloat16 and got.shape == exact.shape
    assert bool(((got.double() - exact).abs() <= bound).all()), float((got.double() - exact).abs().max())


@pytest.mark.parametrize("n,k", [(1, 1), (15, 31), (16, 32), (17, 33), (203, 700), (4099, 640)])
def test_the_loop_is_one_rounding_from_exact_on_ragged_shapes(n, k):
    if not HERE:
        pytest.skip(f"the C gemv is not used on this machine: {gemv.why_not()} (its reason is tested below)")
    g = torch.Generator().manual_seed(n * 1000 + k)
    w, x = torch.randn(n, k, generator=g).bfloat16(), torch.randn(1, k, generator=g).bfloat16()
    _within_a_rounding(gemv.gemv(x, w), x, w)
    # a strided row and weight are made contiguous first, not misread
    wide = torch.randn(n, 2 * k, generator=g).bfloat16()
    _within_a_rounding(gemv.gemv(x, wide[:, ::2]), x, wide[:, ::2])


@pytest.mark.skipif(not kernels.bf16_native(), reason="oneDNN has no native bfloat16 on this CPU (tested by the avx2 run below)")
def test_one_row_takes_the_loop_and_several_take_onednn_with_the_same_products(monkeypatch):
    torch.manual_seed(0)
    w, x = torch.randn(3000, 640).bfloat16(), torch.randn(3, 640).bfloat16()
    one = kernels.bf16_product(x[:1], w)
    monkeypatch.setenv(gemv.ENV, "0")  # forced off: oneDNN for one row too
    assert not gemv.available() and gemv.why_not() == f"{gemv.ENV}=0"
    onednn = kernels.bf16_product(x[:1], w)
    _within_a_rounding(onednn, x[:1], w)
    assert float((one.float() - onednn.float()).abs().max()) <= float(onednn.float().abs().max()) * 2 ** -7
    _within_a_rounding(kernels.bf16_product(x, w), x, w)  # three rows: oneDNN
    monkeypatch.delenv(gemv.ENV)
    monkeypatch.setenv(kernels.FORCE_PLAIN, "1")
    assert not gemv.available() and gemv.why_not() == f"{kernels.FORCE_PLAIN}=1"


@pytest.mark.skipif(not kernels.bf16_native(), reason="oneDNN has no native bfloat16 on this CPU")
def test_onednns_packed_copy_follows_an_edit_and_goes_with_its_weight():
    w, x = torch.randn(64, 32).bfloat16(), torch.randn(1, 32).bfloat16()
    first = kernels.onednn_packed(w)
    assert kernels.onednn_packed(w) is first
    with torch.no_grad():
        w.mul_(-1)  # an intervention's edit in place: packed again
    assert kernels.onednn_packed(w) is not first
    with pytest.MonkeyPatch.context() as m:
        m.setenv(gemv.ENV, "0")
        _within_a_rounding(kernels.bf16_product(x, w), x, w)
    ptr = w.data_ptr()
    del w
    gc.collect()
    assert ptr not in kernels._ONEDNN


def test_a_failed_build_says_why_and_is_not_retried(monkeypatch, tmp_path):
    monkeypatch.setattr(gemv, "_STATE", {})
    monkeypatch.setattr(gemv, "_cpu_has", lambda flag: True)
    monkeypatch.setenv("GEMMA3_LAB_CACHE", str(tmp_path))
    broken = tmp_path / "cc"
    broken.write_text("#!/bin/sh\necho 'cc: error: unrecognized option -mavx512bf16' >&2\nexit 1\n")
    broken.chmod(0o755)
    monkeypatch.setenv("CC", str(broken))
    assert not gemv.available()
    assert gemv.why_not() == f"{broken} could not build gemv.c step.c step_avx2.c: cc: error: unrecognized option -mavx512bf16"
    assert gemv.why_not(torch.float32) == gemv.why_not()  # one library for both: one build, one answer
    assert not list(tmp_path.glob("kernels/*"))  # no half-written library left behind
    broken.write_text("#!/bin/sh\nexit 99\n")  # asked again: the first answer stands
    assert "unrecognized option" in gemv.why_not()


@pytest.mark.skipif(platform.machine().lower() not in ("x86_64", "amd64"), reason="the loops are x86 intrinsics")
def test_the_sources_build_wherever_there_is_a_compiler(monkeypatch, tmp_path):
    """A build error would not fail the loops' tests: they, and the native step's, skip with
    the compiler's message as their reason, and every path has a fallback. So on an x86
    machine with a C compiler the build itself is asserted, whatever the CPU runs (each
    function names its own instructions). The message is the compiler's first error line."""
    if not any(shutil.which(c) for c in (os.environ.get("CC"), "gcc", "cc") if c):
        pytest.skip("no C compiler on this machine")
    monkeypatch.setattr(gemv, "_STATE", {})
    monkeypatch.setenv("GEMMA3_LAB_CACHE", str(tmp_path))  # built afresh, not taken from the cache
    try:
        gemv.library()
    except Exception as e:  # noqa: BLE001  (the message is the point)
        pytest.fail(str(e))
    assert len(list(tmp_path.glob("kernels/gemv-*.so"))) == 1


def test_without_avx512_bf16_nothing_is_built(monkeypatch):
    monkeypatch.setattr(gemv, "_STATE", {})
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    assert not gemv.available() and "AVX512-BF16" in gemv.why_not()
    assert not gemv.available(torch.float32) and "AVX-512" in gemv.why_not(torch.float32)
    assert gemv.why_not(torch.float16) == "no C loop for torch.float16"


def test_the_built_library_is_kept_in_the_cache_folder(monkeypatch, tmp_path):
    if not HERE:
        pytest.skip(f"the C gemv is not used on this machine: {gemv.why_not()}")
    monkeypatch.setattr(gemv, "_STATE", {})
    monkeypatch.setenv("GEMMA3_LAB_CACHE", str(tmp_path))
    assert gemv.available() and gemv.available(torch.float32)
    built = list((tmp_path / "kernels").iterdir())
    assert len(built) == 1 and built[0].name.startswith("gemv-") and built[0].suffix == ".so"


AVX2 = """
import torch
from gemma3_lab.model import gemv, kernels
w, x = torch.randn(300, 64).bfloat16(), torch.randn(1, 1, 64).bfloat16()
lin = torch.nn.Linear(64, 300, bias=False).bfloat16()
same = torch.equal(kernels.linear(x, lin), torch.nn.functional.linear(x, lin.weight))
lin32 = torch.nn.Linear(64, 300, bias=False)
same32 = torch.equal(kernels.linear(x.float(), lin32), torch.nn.functional.linear(x.float(), lin32.weight))
print(gemv.available(), gemv.available(torch.float32), kernels.bf16_native(), same, same32, gemv.why_not())
"""


def test_a_cpu_held_to_avx2_takes_the_plain_product():
    out = subprocess.run([sys.executable, "-c", AVX2], capture_output=True, text=True, check=True,
                         env={**os.environ, "ATEN_CPU_CAPABILITY": "avx2"}, cwd=Path(__file__).parent.parent)
    assert out.stdout.split(maxsplit=5)[:5] == ["False", "False", "False", "True", "True"], out.stdout
    assert "AVX512-BF16" in out.stdout


@pytest.mark.parametrize("n,k", [(1, 1), (7, 15), (8, 16), (9, 17), (203, 700), (4099, 640)])
def test_the_float32_loop_is_a_float32_sum_from_exact_on_ragged_shapes(n, k):
    if not HERE32:
        pytest.skip(f"the float32 C gemv is not used on this machine: {gemv.why_not(torch.float32)}")
    g = torch.Generator().manual_seed(n * 1000 + k)
    w, x = torch.randn(n, k, generator=g), torch.randn(1, k, generator=g)
    got = gemv.gemv(x, w)
    exact = x.double() @ w.double().T
    bound = (x.double().abs() @ w.double().abs().T) * k * 2 ** -24  # K roundings of the running sums
    assert got.dtype == torch.float32 and got.shape == (1, n)
    assert bool(((got.double() - exact).abs() <= bound).all()), float((got.double() - exact).abs().max())


def test_float32_one_row_products_take_the_loop_with_bits_that_ignore_the_thread_count(monkeypatch):
    """`rows_times` (the plain forward's and every decode step's one-row product) takes the loop
    where it is used, F.linear where it is turned off or gradients are wanted; the loop's bits
    are the same with one thread or two (each output is one thread's sum in a fixed order)."""
    if not HERE32:
        pytest.skip(f"the float32 C gemv is not used on this machine: {gemv.why_not(torch.float32)}")
    torch.manual_seed(0)
    w, x = torch.randn(20001, 640), torch.randn(1, 1, 640)
    fast = kernels.rows_times(x, w)
    assert torch.equal(fast, gemv.gemv(x[0], w).view(1, 1, -1))
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert torch.equal(kernels.rows_times(x, w), fast)
    finally:
        torch.set_num_threads(threads)
    torch.testing.assert_close(fast, torch.nn.functional.linear(x, w), rtol=1e-5, atol=1e-4)
    monkeypatch.setenv(gemv.F32_ENV, "0")
    assert gemv.why_not(torch.float32) == f"{gemv.F32_ENV}=0"
    monkeypatch.setenv(kernels.SPLIT_ENV, "0")
    assert torch.equal(kernels.rows_times(x, w), torch.nn.functional.linear(x, w))
    monkeypatch.delenv(gemv.F32_ENV)
    wg = w[:300].clone().requires_grad_()
    out = kernels.rows_times(x, wg)  # gradients wanted: the plain product, which records them
    assert out.grad_fn is not None and torch.equal(out.detach(), torch.nn.functional.linear(x, w[:300]))


def test_a_few_float32_rows_read_the_weight_once_with_each_rows_own_bits(monkeypatch):
    """Up to MAX_ROWS rows (a batch decoding together) take the loop that reads each weight row
    once for all of them; row m has the bits of x[m] alone, so the app's two columns decode
    as each would alone. One more row takes MKL's product (F.linear, or weight @ x.T where
    timed faster)."""
    if not HERE32:
        pytest.skip(f"the float32 C gemv is not used on this machine: {gemv.why_not(torch.float32)}")
    torch.manual_seed(1)
    w = torch.randn(4099, 333)
    x = torch.randn(gemv.MAX_ROWS + 1, 1, 333)
    for m in range(2, gemv.MAX_ROWS + 1):
        got = kernels.rows_times(x[:m], w)
        assert got.shape == (m, 1, 4099)
        for i in range(m):
            assert torch.equal(got[i], kernels.rows_times(x[i:i + 1], w)[0]), (m, i)
    monkeypatch.setenv(kernels.FEW_ENV, "0")
    assert torch.equal(kernels.rows_times(x, w), torch.nn.functional.linear(x, w))
    torch.testing.assert_close(kernels.rows_times(x[:2], w), torch.nn.functional.linear(x[:2], w), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("n,k", [(1, 1), (7, 15), (9, 17), (203, 700), (4099, 640)])
def test_the_avx2_float32_loop_is_a_float32_sum_from_exact_with_each_rows_own_bits(n, k):
    """The native step's float32 loop for CPUs with AVX2 but not AVX-512 (8 lanes, a masked
    ragged end), called here where the CPU has both: within float32 summation error of exact,
    and up to MAX_ROWS rows in one read each with the bits of that row alone."""
    if not gemv.avx2_available():
        pytest.skip(f"the AVX2 loop is not built here: {gemv.avx2_why_not()}")
    g = torch.Generator().manual_seed(n * 1000 + k)
    w, x = torch.randn(n, k, generator=g), torch.randn(gemv.MAX_ROWS, k, generator=g)
    fn = gemv.loop_function(gemv.AVX2_LOOPS[torch.float32])
    outs = []
    for m in (1, gemv.MAX_ROWS):
        out = torch.empty(m, n)
        fn(w.data_ptr(), x.data_ptr(), out.data_ptr(), m, n, k)
        outs.append(out)
    exact = x.double() @ w.double().T
    bound = (x.double().abs() @ w.double().abs().T) * k * 2 ** -24
    assert bool(((outs[1].double() - exact).abs() <= bound).all()), float((outs[1].double() - exact).abs().max())
    assert torch.equal(outs[0], outs[1][:1])


@pytest.mark.parametrize("n,k", [(1, 1), (7, 15), (9, 17), (203, 700), (4099, 640)])
def test_the_avx2_bfloat16_loop_is_one_rounding_from_exact(n, k):
    """bfloat16 for the native step's AVX2 build (CPUs without AVX512-BF16): weights widened to
    float32, the float32 sum rounded to bfloat16 once."""
    if not gemv.avx2_available(torch.bfloat16):
        pytest.skip(f"the AVX2 loop is not built here: {gemv.avx2_why_not(torch.bfloat16)}")
    g = torch.Generator().manual_seed(n * 1000 + k)
    w, x = torch.randn(n, k, generator=g).bfloat16(), torch.randn(1, k, generator=g).bfloat16()
    out = torch.empty(1, n, dtype=torch.bfloat16)
    gemv.loop_function(gemv.AVX2_LOOPS[torch.bfloat16])(w.data_ptr(), x.data_ptr(), out.data_ptr(), 1, n, k)
    _within_a_rounding(out, x, w)


def test_the_avx2_loop_says_why_it_is_not_there(monkeypatch):
    monkeypatch.setattr(gemv, "_STATE", {})
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "DEFAULT")
    assert not gemv.avx2_available() and "AVX2 and FMA" in gemv.avx2_why_not()
    monkeypatch.setattr(gemv, "_STATE", {})
    monkeypatch.setenv(gemv.F32_ENV, "0")
    assert gemv.avx2_why_not() == f"{gemv.F32_ENV}=0"
