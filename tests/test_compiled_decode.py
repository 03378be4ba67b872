"""The compiled decode step (`compiled_decode`) computes what the plain forward
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
from helpers import bf16_noise_check, greedy_steps, steps_in_turns, tiny_decoder

from gemma3_lab.generate import decode_one, prefill
from gemma3_lab.model import compiled_decode, native_decode
from gemma3_lab.model.kv_cache import KVCache


@pytest.fixture(scope="module", autouse=True)
def no_native_step():
    """The native step (`native_decode`) runs these models first where the CPU has its C
    loops, and then nothing is compiled: here it is off, so the compiled step is what runs."""
    with pytest.MonkeyPatch.context() as m:
        m.setenv(native_decode.ENV, "0")
        yield


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

        def counted(*a, **kw):
            out = run(*a, **kw)
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
    assert counted.n == 16 and res.decode_paths == {"compiled": 5}  # a capture is recorded after the steps
    assert res.captures["blocks.2.hook_resid_post"].tensor().shape[:2] == (1, 3 + 5)
    seen = []
    with compiled_tiny.hooks([("blocks.2.hook_resid_post", lambda t, hook: seen.append(t.shape[1]))]):
        hooked = compiled_tiny.generate(ids, max_new_tokens=6, stop_ids=())
    assert counted.n == 16 and hooked.decode_paths == {"plain": 5}  # a hook sends every step to the plain forward
    assert seen == [3, 1, 1, 1, 1, 1] and hooked.token_ids == plain.token_ids[:6]


def test_a_step_switches_between_compiled_eager_and_plain_mid_generation(compiled_tiny, monkeypatch):
    """All three read and write the same cache buffers: mixing them gives the plain logits."""
    counted = _Counted(monkeypatch)
    ids = torch.tensor([[7, 3, 250, 9]])
    got = steps_in_turns(compiled_tiny, ids, 21, compiled_decode)  # compiled, lean, plain, ...
    assert counted.n == 7
    plain = greedy_steps(compiled_tiny, ids, 21, False)
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
    from gemma3_lab.model import kernels

    half = tiny_decoder(seed=2).to(torch.float16)
    assert half.compile_decode().state == "unavailable" and "float16" in half.compile_status.reason
    with monkeypatch.context() as m:  # a CPU without native bfloat16 products (AVX2)
        m.setattr(kernels, "bf16_native", lambda: False)
        bf16 = tiny_decoder(seed=2).to(torch.bfloat16)
        assert bf16.compile_decode().state == "unavailable"
        assert "bfloat16" in bf16.compile_status.reason and "natively" in bf16.compile_status.reason
    from gemma3_lab.loading.quantize import quantize_model

    # int8 in groups: torch's int8 kernel reads one scale per row, so nothing packed to call
    grouped = quantize_model(tiny_decoder(seed=6), "int8", group_size=32, calibration=None)
    assert grouped.compile_decode().state == "unavailable" and "packed" in grouped.compile_status.reason
    no_cc = tiny_decoder(seed=3)
    monkeypatch.setattr(compiled_decode.shutil, "which", lambda name: None)
    status = no_cc.compile_decode()
    assert status.state == "unavailable" and "no C compiler" in status.reason
    assert tiny_decoder(seed=4).compile_status.state == "off"


@pytest.mark.parametrize("mode", ["int4", "int8"])
def test_compiled_low_bit_steps_match_the_eager_packed_ones(mode, monkeypatch):
    """A quantized model's compiled step calls the same packed kernels (`kernels.packed_mm`)
    inside its graph, its head after it: the eager lean step's tokens, and logits no further
    from the plain forward's (float32 activations on the dequantized weights) than the eager
    step's are. int4 comes out bit for bit; Inductor's own int8 kernel rounds differently
    (0.5% of the logits' scale here, nearer the plain forward than the eager kernel)."""
    from gemma3_lab.loading.quantize import quantize_model

    compiled, eager = (quantize_model(tiny_decoder(seed=7), mode, calibration=None) for _ in range(2))
    status = compiled.compile_decode(background=False)
    assert status.state == "ready", status.describe()
    counted = _Counted(monkeypatch)
    ids = torch.tensor([[2, 17, 33, 5, 80]])
    cache = KVCache(compiled.config.text)
    fast, lean = greedy_steps(compiled, ids, 40, True, cache), greedy_steps(eager, ids, 40, True)
    plain = greedy_steps(eager, ids, 40, False)
    assert counted.n == 40 and cache.paths == {"compiled": 40}
    assert torch.equal(fast.argmax(-1), lean.argmax(-1))
    scale = plain.abs().max()
    ours, theirs = (float((x - plain).abs().max() / scale) for x in (fast, lean))
    assert ours <= theirs * 1.05 and ours < 1e-2, (ours, theirs)
    if mode == "int4":
        assert torch.equal(fast, lean)


def test_the_step_record_from_the_graph_is_the_eager_one(compiled_tiny):
    """The compiled step hands `generate` its logits' logsumexp and argmax: the recorded
    log-probabilities and top candidates are those the eager record computes from the logits."""
    from gemma3_lab.generate import record_step

    ids = torch.tensor([[2, 17, 33]])
    cache = KVCache(compiled_tiny.config.text)
    with torch.no_grad():
        logits = prefill(compiled_tiny, compiled_tiny.to_inputs(ids), cache)
        logits = decode_one(compiled_tiny, int(logits.argmax()), cache, True)
    lse, best = compiled_decode.summary(cache, logits)
    assert best == int(logits.max(-1).indices)
    assert torch.allclose(lse, torch.logsumexp(logits, -1), rtol=0, atol=1e-5)
    tok_ids = [int(logits.argmax())]
    a = record_step(None, tok_ids, 0, 4, logits, 5, "", lse)
    b = record_step(None, tok_ids, 0, 4, logits, 5, "")
    assert a.top_k_ids == b.top_k_ids and abs(a.logprob - b.logprob) < 1e-5
    assert all(abs(p - q) < 1e-5 for (_, p), (_, q) in zip(a.top_k, b.top_k))
    assert compiled_decode.summary(cache, logits.clone()) is None  # only for the logits it made


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


@pytest.mark.real
def test_real_compiled_bfloat16_stays_within_rounding_of_the_plain_path(real_model, monkeypatch):
    """A bfloat16 model where the CPU has native bfloat16 products compiles too, each product
    (`kernels.bf16_product`) called whole from the graph. Its fused loops round to bfloat16 at
    their ends only, so it is held to what the eager bfloat16 step is held to against the
    plain path (tests/test_fast_decode.py): the same greedy tokens, logits as near float32's."""
    import gemma3_lab as gl
    from gemma3_lab.model import kernels

    model = gl.load(dtype="bfloat16", progress=False)
    status = model.compile_decode(background=False)
    if not kernels.bf16_native():
        assert status.state == "unavailable" and "natively" in status.reason
        return
    assert status.state == "ready", status.describe()
    counted = _Counted(monkeypatch)
    ids = model.to_inputs("The capital of France is").input_ids
    cache = KVCache(model.config.text)
    fast, plain = greedy_steps(model, ids, 8, True, cache), greedy_steps(model, ids, 8, False)
    assert counted.n == 8 and cache.paths == {"compiled": 8}
    bf16_noise_check(fast, plain, greedy_steps(real_model, ids, 8, fast=False))
    assert model.generate(ids, max_new_tokens=12, stop_ids=()).token_ids == \
        model.generate(ids, max_new_tokens=12, stop_ids=(), fast=False).token_ids


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
    machine of this project's kind runs. Built here as a CPU whose MKL gemv runs a row on one
    thread gets it (forced: the tiny head is far below where that is timed): every float
    product as Inductor's own loop (`_float_kind`), the other graph of the two a CPU may take;
    the tests above take MKL's gemv."""
    from gemma3_lab.model import kernels

    env = {**os.environ, "ATEN_CPU_CAPABILITY": "avx2", kernels.SPLIT_ENV: "1"}
    out = subprocess.run([sys.executable, "-c", AVX2], capture_output=True, text=True, env=env, timeout=600,
                         cwd=Path(__file__).parent.parent)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.strip().splitlines()
    assert lines[0].startswith("compiled decode step ready"), out.stdout
    assert lines[-1] == "avx2 {'compiled': 12} True True", out.stdout


def test_float_products_follow_the_c_loop_or_how_fast_mkls_gemv_is_here(monkeypatch):
    """Where the float32 C loop is used (`gemv`: AVX-512), the graph calls it as an op for every
    float weight, head included; where it is not, and MKL's gemv runs a row on one thread (the
    head's timing, forced here both ways), the graph multiplies every float weight in its own
    loop; elsewhere by MKL's gemv. A quantized head is never timed: its projections are packed anyway."""
    from gemma3_lab.model import gemv, kernels

    model = tiny_decoder()
    if gemv.available(torch.float32):
        norms, projections, kinds, final, head, floats, table = compiled_decode._owners(model)
        assert floats == ("gemv",) and {k for row in kinds for k in row} == {("gemv",)}
    monkeypatch.setenv(gemv.F32_ENV, "0")
    for forced, kind in (("1", ("loop",)), ("0", ("float",))):
        monkeypatch.setenv(kernels.SPLIT_ENV, forced)
        norms, projections, kinds, final, head, floats, table = compiled_decode._owners(model)
        assert floats == kind and head is model.embed and {k for row in kinds for k in row} == {kind}
    x, w = torch.randn(1, 1, 64), torch.randn(300, 64)
    torch.testing.assert_close(compiled_decode._mm(x, ("loop",), (w,)), x @ w.T, rtol=1e-5, atol=1e-5)
    assert compiled_decode._float_kind(None) == ("float",)
    monkeypatch.delenv(gemv.F32_ENV)
    monkeypatch.setenv(kernels.SPLIT_ENV, "0")
    assert torch.equal(compiled_decode._mm(x, ("gemv",), (w,)), kernels.rows_times(x, w))  # the plain product's bits


def test_the_compiled_step_on_mkls_gemv_matches_too(monkeypatch):
    """The graph of a CPU whose float32 products are MKL's (no C loop: forced off here where it
    is used; the tests above take the C loop on such a CPU, the AVX2 run below the loop)."""
    from gemma3_lab.model import gemv, kernels

    monkeypatch.setenv(gemv.F32_ENV, "0")
    monkeypatch.setenv(kernels.SPLIT_ENV, "0")
    model = tiny_decoder()
    assert compiled_decode._float_kind(model.embed) == ("float",)
    assert model.compile_decode(background=False).state == "ready"
    counted = _Counted(monkeypatch)
    ids = torch.tensor([[2, 17, 33, 5, 80]])
    fast, plain = greedy_steps(model, ids, 12, True), greedy_steps(model, ids, 12, False)
    assert counted.n == 12
    assert torch.equal(fast.argmax(-1), plain.argmax(-1))
    assert float((fast - plain).abs().max() / plain.abs().max()) < 1e-4


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
    # int8 in groups has no packed kernel to compile: asked again at the next generation
    quantize_model(model, "int8", group_size=32, calibration=None)
    assert model.generate(ids, max_new_tokens=4, stop_ids=()).decode_path == "lean"


@pytest.mark.real
def test_real_compiled_int4_is_the_eager_int4(monkeypatch):
    """The bundled 270M at int4: the compiled step's tokens are the eager lean step's (the same
    packed kernels, the int4 head screen after the graph). Its log-probabilities are not bit
    for bit: float32 ops fused by Inductor differ in the last bits, and where that moves a
    value across a bfloat16 rounding (the kernels' activations) it grows over the layers.
    Against the plain forward (float32 activations on the dequantized weights) the eager step
    was 0.035 nats off at most here, the compiled one 0.064: both small beside int4's own
    distance from float32 (0.26 nats at the first token where greedy differs)."""
    import gemma3_lab as gl

    compiled, eager = gl.load(progress=False, quantize="int4"), gl.load(progress=False, quantize="int4")
    status = compiled.compile_decode(background=False)
    assert status.state == "ready", status.describe()
    counted = _Counted(monkeypatch)
    fast = compiled.generate("Once upon a time", max_new_tokens=16, stop_ids=())
    lean = eager.generate("Once upon a time", max_new_tokens=16, stop_ids=())
    assert counted.n == 15 and fast.decode_path == "compiled" and lean.decode_path == "lean"
    assert fast.token_ids == lean.token_ids
    plain = eager.generate("Once upon a time", max_new_tokens=16, stop_ids=(), fast=False)
    assert plain.token_ids == lean.token_ids
    off = [max(abs(a.logprob - b.logprob) for a, b in zip(r.steps, plain.steps)) for r in (fast, lean)]
    assert off[0] < 0.1 and off[1] < 0.1, off
