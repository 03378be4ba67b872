"""The native decode step (`native_decode`, one C call a token) computes what the plain
forward computes: float32 greedy identical, logits within float32 reordering, across the
sliding window and a cache buffer that grows; bfloat16 as the eager bfloat16 step; its step
record is the eager one's; it steps aside for hooks, quantized products and CPUs without its
C loops (forced here by the loops' switches), and then the compiled or eager step runs."""

from __future__ import annotations

import pytest
import torch
from helpers import bf16_noise_check, greedy_steps, steps_in_turns, tiny_decoder

from gemma3_lab.generate import decode_one, prefill
from gemma3_lab.model import gemv, native_decode
from gemma3_lab.model.kv_cache import KVCache

# no build of the native step here (neither AVX-512 nor AVX2, or no compiler): the other steps run
pytestmark = pytest.mark.skipif(native_decode.isa(torch.float32)[0] is None, reason=str(native_decode.isa(torch.float32)[1]))


@pytest.fixture(scope="module")
def tiny():
    return tiny_decoder()


def _rel(a, b) -> float:
    return float((a - b).abs().max() / b.abs().max())


class _Counted:
    """Counts the steps the C step actually ran."""

    def __init__(self, monkeypatch):
        self.n, run = 0, native_decode.step

        def counted(*a, **kw):
            out = run(*a, **kw)
            self.n += out is not None
            return out

        monkeypatch.setattr(native_decode, "step", counted)


def _take_build(build: str, dtype: torch.dtype, monkeypatch) -> None:
    """Make the native step take `build` for `dtype` weights: "avx512" where this CPU has its
    loop, "avx2" (GEMMA3_LAB_NATIVE_ISA=avx2) wherever the CPU has AVX2."""
    if build == "avx512" and not gemv.available(dtype):
        pytest.skip(f"no AVX-512 loop for {dtype} here: {gemv.why_not(dtype)}")
    if build == "avx2":
        if not gemv.avx2_available(dtype):
            pytest.skip(f"no AVX2 loop here: {gemv.avx2_why_not(dtype)}")
        monkeypatch.setenv(native_decode.ISA_ENV, "avx2")


@pytest.fixture(params=["avx512", "avx2"])
def isa(request, monkeypatch):
    """Each float32 test once per build of the step: AVX-512, and the AVX2 one that CPUs
    without AVX-512 take."""
    _take_build(request.param, torch.float32, monkeypatch)
    return request.param


def test_native_steps_match_plain_ones_past_the_window_and_a_grown_buffer(tiny, isa):
    """70 steps: the local layers' buffers slide several times, the global one grows past its
    first 64 slots (and the step's scratch with it)."""
    ids = torch.tensor([[2, 17, 33, 5, 80]])
    cache = KVCache(tiny.config.text)
    fast, plain = greedy_steps(tiny, ids, 70, True, cache), greedy_steps(tiny, ids, 70, False)
    assert cache.paths == {"native": 70} and cache.plan["native"].isa == isa  # every step: no silent fallback
    assert cache.layers[1]._k.shape[2] > 64  # the global layer's buffer grew
    assert torch.equal(fast.argmax(-1), plain.argmax(-1))
    assert _rel(fast, plain) < 1e-5, _rel(fast, plain)


def test_a_step_switches_between_native_eager_and_plain_mid_generation(tiny):
    """All three read and write the same cache buffers: mixing them gives the plain logits."""
    ids = torch.tensor([[7, 3, 250, 9]])
    cache = KVCache(tiny.config.text)
    got = steps_in_turns(tiny, ids, 21, native_decode, cache)  # native, lean, plain, ...
    assert cache.paths == {"native": 7, "lean": 7, "plain": 7}
    plain = greedy_steps(tiny, ids, 21, False)
    assert torch.equal(got.argmax(-1), plain.argmax(-1))
    assert _rel(got, plain) < 1e-5


def test_the_step_record_is_the_eager_one(tiny, monkeypatch):
    """The logsumexp and argmax the C step computes after its head (what `generate` records and
    chooses from) against the eager step's logits reduced by torch."""
    ids = torch.tensor([[2, 17, 33]])
    fast = tiny.generate(ids, max_new_tokens=20, stop_ids=(), record_top_k=5)
    with monkeypatch.context() as m:
        m.setenv(native_decode.ENV, "0")
        lean = tiny.generate(ids, max_new_tokens=20, stop_ids=(), record_top_k=5)
    assert fast.decode_paths == {"native": 19} and lean.decode_paths == {"lean": 19}
    assert fast.token_ids == lean.token_ids
    assert [s.logprob for s in fast.steps] == pytest.approx([s.logprob for s in lean.steps], abs=2e-6)
    assert [s.top_k_ids for s in fast.steps] == [s.top_k_ids for s in lean.steps]
    with torch.no_grad():  # the reductions alone, on one step's own logits
        cache = KVCache(tiny.config.text)
        prefill(tiny, tiny.to_inputs(ids), cache)
        logits = decode_one(tiny, 5, cache, True)
    lse, best = cache.plan["summary"][1:]
    assert int(best) == int(logits.argmax()) and float(lse) == pytest.approx(float(torch.logsumexp(logits, 0)), abs=1e-6)


def test_bfloat16_steps_are_the_eager_bfloat16_steps(tiny, monkeypatch):
    """Activations rounded to bfloat16 where the eager step holds bfloat16 tensors: on the tiny
    model the two agree to the bit over 30 steps; held, as the eager step is, to the plain
    bfloat16 path within bfloat16 noise."""
    if not gemv.available(torch.bfloat16):
        pytest.skip(f"no bfloat16 C loop here: {gemv.why_not(torch.bfloat16)}")
    bf = tiny_decoder().to(torch.bfloat16)
    ids = torch.tensor([[2, 17, 33, 5, 80]])
    cache = KVCache(bf.config.text)
    fast = greedy_steps(bf, ids, 30, True, cache)
    assert cache.paths == {"native": 30}
    monkeypatch.setenv(native_decode.ENV, "0")
    lean = greedy_steps(bf, ids, 30, True)
    assert torch.equal(fast, lean)
    bf16_noise_check(fast, greedy_steps(bf, ids, 30, False), greedy_steps(tiny, ids, 30, False))


def test_hooks_send_every_step_to_the_plain_forward_and_captures_still_see_every_token(tiny, monkeypatch):
    counted = _Counted(monkeypatch)
    ids = torch.tensor([[2, 17, 33]])
    plain = tiny.generate(ids, max_new_tokens=8, stop_ids=(), fast=False)
    res = tiny.generate(ids, max_new_tokens=8, stop_ids=(), capture="blocks.2.hook_resid_post")
    assert counted.n == 7 and res.decode_paths == {"native": 7}  # a capture is recorded after the steps
    assert res.captures["blocks.2.hook_resid_post"].tensor().shape[:2] == (1, 3 + 7)
    seen = []
    with tiny.hooks([("blocks.2.hook_resid_post", lambda t, hook: seen.append(t.shape[1]))]):
        hooked = tiny.generate(ids, max_new_tokens=6, stop_ids=())
    assert counted.n == 7 and hooked.decode_paths == {"plain": 5}
    assert seen == [3, 1, 1, 1, 1, 1] and res.token_ids == plain.token_ids and hooked.token_ids == plain.token_ids[:6]


def test_what_the_native_step_cannot_run_says_why_and_decodes_another_way(monkeypatch):
    from gemma3_lab.loading.quantize import quantize_model

    model = tiny_decoder(seed=2)
    ids = torch.tensor([[2, 17, 33]])
    assert native_decode.why_not(model) is None
    told = []
    assert model.compile_decode(announce=told.append).state == "native" and [t.state for t in told] == ["native"]
    assert "nothing to compile" in model.compile_decode().describe() and model.compile_status.state == "off"
    with monkeypatch.context() as m:
        m.setenv(native_decode.ENV, "0")
        assert native_decode.why_not(model) == "GEMMA3_LAB_NATIVE_STEP=0"
    with monkeypatch.context() as m:  # as on a CPU without AVX-512: the loop's own switch
        m.setenv(gemv.F32_ENV, "0")
        assert "no C loop for float32" in native_decode.why_not(model)
        assert model.generate(ids, max_new_tokens=4, stop_ids=()).decode_path == "lean"
    half = tiny_decoder(seed=2).to(torch.float16)
    assert "float16" in native_decode.why_not(half)
    bq = tiny_decoder(seed=2).to(torch.bfloat16)
    quantize_model(bq, mode="int8")
    if gemv.available(torch.bfloat16):
        assert "quantized" in native_decode.why_not(bq)  # quantized projections: float32 models only
    assert bq.generate(ids, max_new_tokens=4, stop_ids=()).decode_path == "lean"


@pytest.mark.parametrize("mode, options", [("int8", {}), ("int4", dict(group_size=16)),
                                           ("int4", dict(group_size=32, embedding="float", screen=False))])
def test_quantized_projections_read_their_codes_and_follow_the_plain_forward(tiny, mode, options, isa):
    """int8 per row and int4 in groups, read by the C loops from the codes (float32
    activations, float32 lo and step): the plain forward's arithmetic on its dequantized
    weights, reordered. With a float head the logits agree to ~1e-5; a quantized head and
    table run in torch around the call, and the head's packed kernel takes bfloat16
    activations, as the eager step's does."""
    from gemma3_lab.loading.quantize import quantize_model

    q = quantize_model(tiny_decoder(), mode=mode, **options)
    assert native_decode.why_not(q) is None
    ids = torch.tensor([[2, 17, 33, 5, 80]])
    cache = KVCache(q.config.text)
    fast, plain = greedy_steps(q, ids, 40, True, cache), greedy_steps(q, ids, 40, False)
    assert cache.paths == {"native": 40} and cache.plan["native"].isa == isa
    assert torch.equal(fast.argmax(-1), plain.argmax(-1))
    gap = float((torch.log_softmax(fast, -1) - torch.log_softmax(plain, -1)).abs().max())
    assert gap < (1e-4 if q.lm_head is None else 0.05), gap


def test_quantized_layouts_the_loops_do_not_read_take_the_other_steps():
    from gemma3_lab.loading.quantize import quantize_model

    q = quantize_model(tiny_decoder(), mode="int8", group_size=32)  # int8 in groups: only per row is read
    assert "int8/int4 in a layout" in native_decode.why_not(q)
    assert q.generate(torch.tensor([[2, 17, 33]]), max_new_tokens=3, stop_ids=()).decode_path != "native"


@pytest.mark.parametrize("kind, build", [("float32", "avx512"), ("float32", "avx2"), ("bfloat16", "avx512"),
                                         ("bfloat16", "avx2"), ("int4", "avx512"), ("int4", "avx2")])
def test_rows_decoding_together_each_have_the_bits_of_that_row_alone(tiny, kind, build, monkeypatch):
    """Two rows from one prompt (generate_batch's case, the app's two columns) in one native
    step: float32 weights read once for both, bfloat16 and quantized ones once a row. Each row's
    logits are those of the same row decoded alone, to the bit, past the window and the cache's
    growth, and follow the plain forward of both rows."""
    from gemma3_lab.generate import decode_rows
    from gemma3_lab.loading.quantize import quantize_model

    _take_build(build, torch.bfloat16 if kind == "bfloat16" else torch.float32, monkeypatch)
    model = {"float32": lambda: tiny, "bfloat16": lambda: tiny_decoder().to(torch.bfloat16),
             "int4": lambda: quantize_model(tiny_decoder(), mode="int4", group_size=32, embedding="float", screen=False)}[kind]()
    both, plain = KVCache(model.config.text), KVCache(model.config.text)
    alone = [KVCache(model.config.text) for _ in range(2)]
    with torch.no_grad():
        for cache in (both, plain, *alone):
            prefill(model, model.to_inputs(torch.tensor([[2, 17, 33, 5]])), cache)
        for cache in (both, plain):
            cache.repeat_rows(2)
        ids = [[7, 91]]
        for _ in range(70):
            a = decode_rows(model, ids[-1], both, fast=True)
            for r in range(2):
                assert torch.equal(a[r], decode_one(model, ids[-1][r], alone[r], True))
            b = decode_rows(model, ids[-1], plain, fast=False)
            assert torch.equal(a.argmax(-1), b.argmax(-1))
            if kind != "bfloat16":
                assert _rel(a, b) < 1e-4
            ids.append([int(a[0].argmax()), int(a[1].topk(2).indices[1])])  # the rows part ways
    assert both.paths == {"native": 70} and all(c.paths == {"native": 70} for c in alone)
    assert both.plan["native"].isa == build


def test_a_cpu_without_avx512_takes_the_avx2_build(tiny, monkeypatch):
    """Where the AVX-512 loops are missing (made so here), float32, int8/int4 and bfloat16
    models take the AVX2 build (bfloat16 weights widened to float32 as they are read): float32
    greedy as the plain path's, bfloat16 within bfloat16 noise of it; without AVX2 either,
    none, and it says why."""
    if not gemv.avx2_available() or not gemv.avx2_available(torch.bfloat16):
        pytest.skip(f"no AVX2 loop here: {gemv.avx2_why_not()}")
    monkeypatch.setattr(gemv, "available", lambda dtype=torch.bfloat16: False)
    monkeypatch.setattr(gemv, "why_not", lambda dtype=torch.bfloat16: "the CPU has no AVX-512")
    assert native_decode.isa(torch.float32) == native_decode.isa(torch.bfloat16) == ("avx2", None)
    ids = torch.tensor([[2, 17, 33, 5, 80]])
    res = tiny.generate(ids, max_new_tokens=6, stop_ids=())
    assert res.decode_paths == {"native": 5}
    assert res.token_ids == tiny.generate(ids, max_new_tokens=6, stop_ids=(), fast=False).token_ids
    bf = tiny_decoder().to(torch.bfloat16)
    cache = KVCache(bf.config.text)
    fast = greedy_steps(bf, ids, 30, True, cache)
    assert cache.paths == {"native": 30} and cache.plan["native"].isa == "avx2"
    bf16_noise_check(fast, greedy_steps(bf, ids, 30, False), greedy_steps(tiny, ids, 30, False))
    monkeypatch.setattr(gemv, "avx2_available", lambda dtype=torch.float32: False)
    assert native_decode.why_not(tiny) == "no C loop for float32 products here: the CPU has no AVX-512"


def test_the_library_and_this_files_step_agree_on_its_layout():
    """step.c's struct and native_decode.Step, field for field: the library says its size."""
    import ctypes

    lib = gemv.library()
    assert lib.step_size() == lib.step_size_avx2() == ctypes.sizeof(native_decode.Step) == 8 * len(native_decode.Step._fields_)


@pytest.mark.real
def test_real_native_greedy_is_the_plain_greedy(real_model, isa):
    for prompt in ["The capital of France is", "Once upon a time"]:
        fast = real_model.generate(prompt, max_new_tokens=24, stop_ids=())
        plain = real_model.generate(prompt, max_new_tokens=24, stop_ids=(), fast=False)
        assert fast.decode_paths == {"native": 23}
        assert fast.token_ids == plain.token_ids, prompt
        assert [s.logprob for s in fast.steps] == pytest.approx([s.logprob for s in plain.steps], abs=1e-4)


@pytest.mark.real
@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_real_quantized_native_greedy_is_the_plain_greedy(mode, request):
    """load's int8 and int4 defaults (per-row int8 or calibrated int4 g32 projections, int8
    table, int4 head screen): the native step's greedy tokens are the plain forward's."""
    import gemma3_lab as gl

    model = request.getfixturevalue("int4_model") if mode == "int4" else gl.load(quantize="int8", progress=False)
    prompt = {"int8": "Once upon a time", "int4": "The capital of France is"}[mode]  # the plain forward is slow here
    fast = model.generate(prompt, max_new_tokens=12, stop_ids=())
    plain = model.generate(prompt, max_new_tokens=12, stop_ids=(), fast=False)
    assert fast.decode_paths == {"native": 11}
    assert fast.token_ids == plain.token_ids, prompt
    assert [s.logprob for s in fast.steps] == pytest.approx([s.logprob for s in plain.steps], abs=0.05)


@pytest.mark.real
@pytest.mark.parametrize("build", ["avx512", "avx2"])
def test_real_native_bfloat16_stays_within_rounding_of_the_plain_path(real_model, build, monkeypatch):
    import gemma3_lab as gl

    _take_build(build, torch.bfloat16, monkeypatch)
    model = gl.load(dtype="bfloat16", progress=False)
    ids = model.to_inputs("The capital of France is").input_ids
    cache = KVCache(model.config.text)
    fast, plain = greedy_steps(model, ids, 8, True, cache), greedy_steps(model, ids, 8, False)
    assert cache.paths == {"native": 8}
    bf16_noise_check(fast, plain, greedy_steps(real_model, ids, 8, fast=False))
    # longer, the same tokens up to the plain path's first exact tie: bfloat16 logits near 17
    # lie 1/8 apart, and at its 12th token the plain path's top two are both 16.875
    plain = greedy_steps(model, ids, 16, False)
    top2 = plain.topk(2, dim=-1).values
    ties = (top2[:, 0] == top2[:, 1]).nonzero()
    n = int(ties[0]) if len(ties) else plain.shape[0]
    assert n >= 8
    assert model.generate(ids, max_new_tokens=n, stop_ids=()).token_ids == plain.argmax(-1)[:n].tolist()
