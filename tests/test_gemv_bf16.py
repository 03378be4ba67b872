"""The C bfloat16 gemv (`gemv_bf16`) for one-row bfloat16 decode products: within one
bfloat16 rounding of exact arithmetic on ragged shapes, equal to oneDNN's product within
rounding, built once into the cache folder, and honest about why it is not used where the CPU
(or torch's held-back ISA), the compiler or the user says no; the CPU without it (forced
here with ATEN_CPU_CAPABILITY=avx2) takes oneDNN or F.linear instead."""

from __future__ import annotations

import gc
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gemma3_lab.model import gemv_bf16, kernels

HERE = gemv_bf16.available()  # this CPU has AVX512-BF16 and a compiler: the loop itself is tested


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
        pytest.skip(f"the C gemv is not used on this machine: {gemv_bf16.why_not()} (its reason is tested below)")
    g = torch.Generator().manual_seed(n * 1000 + k)
    w, x = torch.randn(n, k, generator=g).bfloat16(), torch.randn(1, k, generator=g).bfloat16()
    _within_a_rounding(gemv_bf16.gemv(x, w), x, w)
    # a strided row and weight are made contiguous first, not misread
    wide = torch.randn(n, 2 * k, generator=g).bfloat16()
    _within_a_rounding(gemv_bf16.gemv(x, wide[:, ::2]), x, wide[:, ::2])


@pytest.mark.skipif(not kernels.bf16_native(), reason="oneDNN has no native bfloat16 on this CPU (tested by the avx2 run below)")
def test_one_row_takes_the_loop_and_several_take_onednn_with_the_same_products(monkeypatch):
    torch.manual_seed(0)
    w, x = torch.randn(3000, 640).bfloat16(), torch.randn(3, 640).bfloat16()
    one = kernels.bf16_product(x[:1], w)
    monkeypatch.setenv(gemv_bf16.ENV, "0")  # forced off: oneDNN for one row too
    assert not gemv_bf16.available() and gemv_bf16.why_not() == f"{gemv_bf16.ENV}=0"
    onednn = kernels.bf16_product(x[:1], w)
    _within_a_rounding(onednn, x[:1], w)
    assert float((one.float() - onednn.float()).abs().max()) <= float(onednn.float().abs().max()) * 2 ** -7
    _within_a_rounding(kernels.bf16_product(x, w), x, w)  # three rows: oneDNN
    monkeypatch.delenv(gemv_bf16.ENV)
    monkeypatch.setenv(kernels.FORCE_PLAIN, "1")
    assert not gemv_bf16.available() and gemv_bf16.why_not() == f"{kernels.FORCE_PLAIN}=1"


@pytest.mark.skipif(not kernels.bf16_native(), reason="oneDNN has no native bfloat16 on this CPU")
def test_onednns_packed_copy_follows_an_edit_and_goes_with_its_weight():
    w, x = torch.randn(64, 32).bfloat16(), torch.randn(1, 32).bfloat16()
    first = kernels.onednn_packed(w)
    assert kernels.onednn_packed(w) is first
    with torch.no_grad():
        w.mul_(-1)  # an intervention's edit in place: packed again
    assert kernels.onednn_packed(w) is not first
    with pytest.MonkeyPatch.context() as m:
        m.setenv(gemv_bf16.ENV, "0")
        _within_a_rounding(kernels.bf16_product(x, w), x, w)
    ptr = w.data_ptr()
    del w
    gc.collect()
    assert ptr not in kernels._ONEDNN


def test_a_failed_build_says_why_and_is_not_retried(monkeypatch, tmp_path):
    monkeypatch.setattr(gemv_bf16, "_STATE", {})
    monkeypatch.setattr(gemv_bf16, "_cpu_has_bf16", lambda: True)
    monkeypatch.setenv("GEMMA3_LAB_CACHE", str(tmp_path))
    broken = tmp_path / "cc"
    broken.write_text("#!/bin/sh\necho 'cc: error: unrecognized option -mavx512bf16' >&2\nexit 1\n")
    broken.chmod(0o755)
    monkeypatch.setenv("CC", str(broken))
    assert not gemv_bf16.available()
    assert gemv_bf16.why_not() == f"{broken} could not build gemv_bf16.c: cc: error: unrecognized option -mavx512bf16"
    assert not list(tmp_path.glob("kernels/*"))  # no half-written library left behind
    broken.write_text("#!/bin/sh\nexit 99\n")  # asked again: the first answer stands
    assert "unrecognized option" in gemv_bf16.why_not()


def test_without_avx512_bf16_nothing_is_built(monkeypatch):
    monkeypatch.setattr(gemv_bf16, "_STATE", {})
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    assert not gemv_bf16.available() and "AVX512-BF16" in gemv_bf16.why_not()


def test_the_built_library_is_kept_in_the_cache_folder(monkeypatch, tmp_path):
    if not HERE:
        pytest.skip(f"the C gemv is not used on this machine: {gemv_bf16.why_not()}")
    monkeypatch.setattr(gemv_bf16, "_STATE", {})
    monkeypatch.setenv("GEMMA3_LAB_CACHE", str(tmp_path))
    assert gemv_bf16.available()
    built = list((tmp_path / "kernels").iterdir())
    assert len(built) == 1 and built[0].name.startswith("gemv_bf16-") and built[0].suffix == ".so"


AVX2 = """
import torch
from gemma3_lab.model import gemv_bf16, kernels
w, x = torch.randn(300, 64).bfloat16(), torch.randn(1, 1, 64).bfloat16()
lin = torch.nn.Linear(64, 300, bias=False).bfloat16()
same = torch.equal(kernels.linear(x, lin), torch.nn.functional.linear(x, lin.weight))
print(gemv_bf16.available(), kernels.bf16_native(), same, gemv_bf16.why_not())
"""


def test_a_cpu_held_to_avx2_takes_the_plain_product():
    out = subprocess.run([sys.executable, "-c", AVX2], capture_output=True, text=True, check=True,
                         env={**os.environ, "ATEN_CPU_CAPABILITY": "avx2"}, cwd=Path(__file__).parent.parent)
    assert out.stdout.split(maxsplit=3)[:3] == ["False", "False", "True"], out.stdout
    assert "AVX512-BF16" in out.stdout
