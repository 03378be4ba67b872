"""The compiled float32 decode step (`compiled_decode`) computes what the plain forward
computes, within float32 reordering: greedy identical, logits within 1e-4 of their scale,
across the sliding window and a cache buffer that grows; it steps aside for hooks, and a
compiler that fails or is absent leaves the eager lean step in charge."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import greedy_steps, tiny_decoder

from gemma3_lab.generate import decode_one, prefill
from gemma3_lab.model import compiled_decode
from gemma3_lab.model.kv_cache import KVCache


@pytest.fixture(scope="module")
def compiled_tiny():
    model = tiny_decoder()
    status = model.compile_decode(background=False)
    assert status.state == "ready", status.describe()
    assert "compiled in" in status.describe()
    return model


class _Counted:
    """Counts the steps the compiled graph actually ran."""

    def __init__(self, monkeypatch):
        self.n, run = 0, compiled_decode._run

        def counted(*a):
            out = run(*a)
            self.n += 1
            return out

        monkeypatch.setattr(compiled_decode, "_run", counted)


def test_compiled_steps_match_plain_ones_past_the_window_and_a_grown_buffer(compiled_tiny, monkeypatch):
    """70 steps: the local layers' buffers slide several times, the global one grows past
    its first 64 slots (new shapes, the same graph)."""
    counted = _Counted(monkeypatch)
    ids = torch.tensor([[2, 17, 33, 5, 80]])
    fast, plain = greedy_steps(compiled_tiny, ids, 70, True), greedy_steps(compiled_tiny, ids, 70, False)
    assert counted.n == 70  # every step took the compiled graph: no silent fallback
    assert torch.equal(fast.argmax(-1), plain.argmax(-1))
    err = (fast - plain).abs().max() / plain.abs().max()
    assert float(err) < 1e-4, float(err)


def test_generate_takes_the_compiled_step_and_hooks_still_see_every_token(compiled_tiny, monkeypatch):
    counted = _Counted(monkeypatch)
    ids = torch.tensor([[2, 17, 33]])
    fast = compiled_tiny.generate(ids, max_new_tokens=12, stop_ids=())
    assert counted.n == 11
    plain = compiled_tiny.generate(ids, max_new_tokens=12, stop_ids=(), fast=False)
    assert fast.token_ids == plain.token_ids
    res = compiled_tiny.generate(ids, max_new_tokens=6, stop_ids=(), capture="blocks.2.hook_resid_post")
    assert counted.n == 11  # a hook sends every step to the plain forward
    assert res.captures["blocks.2.hook_resid_post"].tensor().shape[:2] == (1, 3 + 5)


def test_a_step_switches_between_compiled_eager_and_plain_mid_generation(compiled_tiny, monkeypatch):
    """All three read and write the same cache buffers: mixing them gives the plain logits."""
    counted = _Counted(monkeypatch)
    ids = torch.tensor([[7, 3, 250, 9]])
    cache = KVCache(compiled_tiny.config.text)
    got = []
    with torch.no_grad():
        logits = prefill(compiled_tiny, compiled_tiny.to_inputs(ids), cache)
        for i in range(21):
            got.append(logits)
            nxt = int(logits.argmax())
            if i % 3 == 0:
                logits = decode_one(compiled_tiny, nxt, cache, True)  # compiled
            elif i % 3 == 1:
                with monkeypatch.context() as m:  # the eager lean step
                    m.setattr(compiled_decode, "step", lambda *a: None)
                    logits = decode_one(compiled_tiny, nxt, cache, True)
            else:
                logits = decode_one(compiled_tiny, nxt, cache, False)  # the plain forward
    assert counted.n == 7
    got, plain = torch.stack(got), greedy_steps(compiled_tiny, ids, 20, False)
    assert torch.equal(got.argmax(-1), plain.argmax(-1))
    assert float((got - plain).abs().max() / plain.abs().max()) < 1e-4


def test_a_failing_compiler_leaves_the_eager_step_in_charge(monkeypatch):
    model = tiny_decoder(seed=1)

    def broken():
        raise RuntimeError("C++ compile error: no such header\nmore lines")

    monkeypatch.setattr(compiled_decode, "_graph", broken)
    status = model.compile_decode(background=False)
    assert status.state == "failed" and "no such header" in status.reason and "more lines" not in status.reason
    assert "eager lean step runs" in status.describe()
    ids = torch.tensor([[2, 17, 33]])
    assert torch.equal(greedy_steps(model, ids, 6, True), greedy_steps(model, ids, 6, False))  # bit-for-bit: the eager step
    assert model.compile_decode().state == "failed"  # asked again: once per process, not retried


def test_what_cannot_be_compiled_says_why(monkeypatch):
    bf16 = tiny_decoder(seed=2).to(torch.bfloat16)
    assert bf16.compile_decode().state == "unavailable"
    assert "bfloat16" in bf16.compile_status.reason
    from gemma3_lab.loading.quantize import quantize_model

    int8 = quantize_model(tiny_decoder(seed=6), "int8", calibration=None)
    assert int8.compile_decode().state == "unavailable" and "quantized" in int8.compile_status.reason
    no_cc = tiny_decoder(seed=3)
    monkeypatch.setattr(compiled_decode.shutil, "which", lambda name: None)
    status = no_cc.compile_decode()
    assert status.state == "unavailable" and "no C compiler" in status.reason
    assert tiny_decoder(seed=4).compile_status.state == "off"


def test_background_compile_reports_progress_then_ready():
    model = tiny_decoder()  # the same shapes as compiled_tiny's: the graph is reused, seconds not minutes
    told = []
    first = model.compile_decode(background=True, announce=told.append)
    assert first.state in ("compiling", "ready")
    assert compiled_decode.wait(model, timeout=300).state == "ready"
    assert [s.state for s in told] == ["ready"] and told[0].seconds > 0
    assert model.generate(torch.tensor([[2, 17, 33]]), max_new_tokens=5, stop_ids=()).decode_path == "compiled"


@pytest.mark.real
def test_real_compiled_greedy_is_the_plain_greedy(real_model, monkeypatch):
    import gemma3_lab as gl

    model = gl.load(progress=False)  # its own model: the session's real_model stays uncompiled
    status = model.compile_decode(background=False)
    assert status.state == "ready", status.describe()
    counted = _Counted(monkeypatch)
    for prompt in ["The capital of France is", "Once upon a time"]:
        fast = model.generate(prompt, max_new_tokens=24, stop_ids=())
        plain = real_model.generate(prompt, max_new_tokens=24, stop_ids=(), fast=False)
        assert fast.token_ids == plain.token_ids, prompt
    assert counted.n == 2 * 23


AVX2 = """
import sys, torch
sys.path.insert(0, "tests")
from helpers import greedy_steps, tiny_decoder
from gemma3_lab.model.kv_cache import KVCache
from torch._inductor.cpu_vec_isa import pick_vec_isa

ids = torch.tensor([[2, 17, 33, 5, 80]])
model = tiny_decoder()
print(model.compile_decode(background=False).describe())
cache = KVCache(model.config.text)
fast, plain = greedy_steps(model, ids, 12, True, cache), greedy_steps(model, ids, 12, False)
err = float((fast - plain).abs().max() / plain.abs().max())
print(pick_vec_isa(), dict(cache.paths), bool(torch.equal(fast.argmax(-1), plain.argmax(-1))), err < 1e-4)
"""


def test_the_compiled_step_built_for_avx2_matches_too():
    """Inductor writes its loops for the CPU's vector ISA: the AVX2 build is what an AVX2-only
    machine of this project's kind runs (on one, this is the same build as the tests above)."""
    env = {**os.environ, "ATEN_CPU_CAPABILITY": "avx2"}
    out = subprocess.run([sys.executable, "-c", AVX2], capture_output=True, text=True, env=env, timeout=600,
                         cwd=Path(__file__).parent.parent)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.strip().splitlines()
    assert lines[0].startswith("compiled float32 decode step ready"), out.stdout
    assert lines[-1] == "avx2 {'compiled': 12} True True", out.stdout


def test_inductors_disk_cache_has_a_folder_per_isa_unless_the_user_chose_one(monkeypatch, tmp_path):
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    base = os.path.abspath(default_cache_dir())
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    for start in (None, base, os.path.join(base, "gemma3_lab-avx512")):  # unset, Inductor's, a parent's
        if start is None:
            monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
        else:
            monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", start)
        compiled_decode._cache_per_isa()
        assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == os.path.join(base, "gemma3_lab-avx2"), start
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    compiled_decode._cache_per_isa()
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path)


def test_a_model_quantized_after_compiling_takes_the_lean_step(monkeypatch):
    from gemma3_lab.loading.quantize import quantize_model

    model = tiny_decoder()  # compiled_tiny's shapes: the graph is reused
    assert model.compile_decode(background=False).state == "ready"
    ids = torch.tensor([[2, 17, 33]])
    assert model.generate(ids, max_new_tokens=4, stop_ids=()).decode_path == "compiled"
    quantize_model(model, "int8", calibration=None)
    assert model.generate(ids, max_new_tokens=4, stop_ids=()).decode_path == "lean"
