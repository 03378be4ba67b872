"""The lean decode step and its kernels compute what the plain instrumented forward computes:
bit-for-bit in float32, within bfloat16 rounding in bfloat16; any hook sends a step back
to the plain path; the preallocated KV cache returns what concatenation would."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from helpers import bf16_noise_check, greedy_steps, tiny_decoder

from gemma3_lab.generate import decode_one, prefill
from gemma3_lab.model import gemv, kernels, native_decode
from gemma3_lab.model.fast_decode import decode_step
from gemma3_lab.model.kv_cache import KVCache, LayerCache

PROMPTS = ["The capital of France is", "Once upon a time", "def fibonacci(n):"]


@pytest.fixture(scope="module", autouse=True)
def no_native_step():
    """Steps of one row take the native step first where the CPU has its C loops
    (tests/test_native_decode.py); here it is off, so the eager lean step is what runs."""
    with pytest.MonkeyPatch.context() as m:
        m.setenv(native_decode.ENV, "0")
        yield


@pytest.fixture(scope="module")
def tiny():
    return tiny_decoder()


@pytest.mark.parametrize("keep", [None, 3, 7])
def test_layer_cache_returns_what_concatenation_would(keep):
    """Growth (global) and sliding back to the front (local) over prompts and single steps."""
    cache, ref_k = LayerCache(keep), None
    g = torch.Generator().manual_seed(0)
    for S in [5, 1, 1, 9, *[1] * 150, 2, 1]:
        k = torch.randn(1, 2, S, 4, generator=g)
        got_k, got_v = cache.update(k, -k)
        full = k if ref_k is None else torch.cat((ref_k, k), dim=2)
        ref_k = full if keep is None else full[:, :, -keep:]
        assert torch.equal(got_k, full) and torch.equal(got_v, -full)
        assert torch.equal(cache.k, ref_k) and torch.equal(cache.v, -ref_k)


def test_tiny_fast_steps_equal_plain_ones_past_the_window(tiny):
    ids = torch.tensor([[2, 17, 33, 5, 80]])
    assert torch.equal(greedy_steps(tiny, ids, 12, fast=True), greedy_steps(tiny, ids, 12, fast=False))


def test_a_hook_anywhere_sends_the_step_to_the_plain_forward(tiny):
    cache = KVCache(tiny.config.text)
    with torch.no_grad():
        prefill(tiny, tiny.to_inputs(torch.tensor([[2, 17, 33]])), cache)
        assert decode_step(tiny, 5, cache) is not None
        calls = []
        handle = tiny.blocks[1].mlp.down_proj.register_forward_hook(lambda *a: calls.append(1))
        try:
            assert decode_step(tiny, 6, cache) is None  # nothing done: the cache did not move
            assert cache.length == 4
            decode_one(tiny, 6, cache, fast=True)
        finally:
            handle.remove()
    assert calls == [1] and cache.length == 5
    tiny.blocks[0].attn.explicit = True
    try:
        assert decode_step(tiny, 7, cache) is None
    finally:
        tiny.blocks[0].attn.explicit = False
    seen = []  # hooks scoped to this call by model.hooks() live in a context variable, not on modules
    with tiny.hooks([("blocks.1.hook_resid_post", lambda t, hook: seen.append(1))]):
        assert decode_step(tiny, 7, cache) is None
        decode_one(tiny, 7, cache, fast=True)
    assert seen == [1]


def test_generate_with_capture_sees_every_step(tiny):
    res = tiny.generate(torch.tensor([[2, 17, 33]]), max_new_tokens=5, stop_ids=(), capture="blocks.2.hook_resid_post")
    cap = res.captures["blocks.2.hook_resid_post"]
    assert cap.tensor().shape[:2] == (1, 3 + 4)  # the prompt and every decoded token but the last


@pytest.mark.real
def test_float32_fast_greedy_is_the_plain_greedy(real_model):
    for prompt in PROMPTS:
        fast = real_model.generate(prompt, max_new_tokens=16, stop_ids=(), fast=True)
        plain = real_model.generate(prompt, max_new_tokens=16, stop_ids=(), fast=False)
        assert fast.token_ids == plain.token_ids, prompt
    ids = real_model.to_inputs(PROMPTS[0]).input_ids
    assert torch.equal(greedy_steps(real_model, ids, 4, fast=True), greedy_steps(real_model, ids, 4, fast=False))


@pytest.fixture(scope="module")
def bf16_model(real_folder):
    import gemma3_lab as gl

    return gl.load(dtype="bfloat16", progress=False)


@pytest.mark.real
def test_bfloat16_fast_steps_stay_within_rounding_of_plain_ones(bf16_model, real_model):
    """The C gemv (`gemv`, where built) sums its products in another order than torch's
    bfloat16 matmul, and the attention products run in float32: the same greedy tokens, and
    logits as near float32's as the plain bfloat16 path's are. With the gemv turned off the
    lean step multiplies as the plain path does (oneDNN), to the bit."""
    from gemma3_lab.model import gemv

    ids = bf16_model.to_inputs(PROMPTS[0]).input_ids
    cache = KVCache(bf16_model.config.text)
    with torch.no_grad():
        prefill(bf16_model, bf16_model.to_inputs(ids), cache)
        assert decode_step(bf16_model, 5, cache) is not None  # the lean step is what runs
    fast, plain = greedy_steps(bf16_model, ids, 6, fast=True), greedy_steps(bf16_model, ids, 6, fast=False)
    bf16_noise_check(fast, plain, greedy_steps(real_model, ids, 6, fast=False))
    if kernels.bf16_native():
        with pytest.MonkeyPatch.context() as m:
            m.setenv(gemv.ENV, "0")
            assert torch.equal(greedy_steps(bf16_model, ids, 6, fast=True), plain)


FALLBACK = """
import torch, gemma3_lab as gl
from gemma3_lab.model import kernels
m = gl.load(dtype="bfloat16", progress=False)
ids = m.to_inputs("The capital of France is").input_ids
a = m.generate(ids, max_new_tokens=4, stop_ids=(), fast=True).token_ids
b = m.generate(ids, max_new_tokens=4, stop_ids=(), fast=False).token_ids
print(kernels.bf16_native(), torch.backends.cpu.get_cpu_capability(), a == b)
"""


def test_plain_kernels_can_be_forced(monkeypatch):
    monkeypatch.setenv(kernels.FORCE_PLAIN, "1")
    assert not kernels.bf16_native()
    x, lin = torch.randn(1, 1, 64).bfloat16(), torch.nn.Linear(64, 32, bias=False).bfloat16()
    assert torch.equal(kernels.linear(x, lin), torch.nn.functional.linear(x, lin.weight))


@pytest.mark.real
def test_bfloat16_fallback_without_native_kernels(real_folder):
    """Where the CPU has no AVX-512 (forced here), bfloat16 projections take F.linear and
    the lean step still gives the plain greedy."""
    out = subprocess.run([sys.executable, "-c", FALLBACK], capture_output=True, text=True, check=True,
                         env={**os.environ, "ATEN_CPU_CAPABILITY": "avx2"},
                         cwd=os.path.dirname(os.path.dirname(__file__)))
    native, _, same = out.stdout.split()
    assert native == "False" and same == "True"


@pytest.mark.parametrize("transposed", ["1", "0"])
@pytest.mark.parametrize("rows", [1, 2, 5, kernels.FEW_ROWS, kernels.FEW_ROWS + 1])
def test_few_rows_product_equals_the_plain_one(rows, transposed, monkeypatch):
    """`rows_times` (weight @ x.T for a few rows where that is faster, forced both ways here)
    gives x @ weight.T: bit for bit for one row (both are one GEMV; the C loop, where the CPU
    takes it, is tested in test_gemv) and where it is not transposed, to float32 rounding
    otherwise, in the input's leading shape; forced plain, it is the plain product itself."""
    monkeypatch.setenv(gemv.F32_ENV, "0")
    monkeypatch.setenv(kernels.FEW_ENV, transposed)
    torch.manual_seed(rows)
    w, x = torch.randn(3000, 64), torch.randn(rows, 1, 64)
    got, plain = kernels.rows_times(x, w), x @ w.T
    assert got.shape == plain.shape == (rows, 1, 3000) and got.is_contiguous()
    if rows == 1 or rows > kernels.FEW_ROWS or transposed == "0":
        assert torch.equal(got, plain)
    torch.testing.assert_close(got, plain, rtol=1e-5, atol=1e-5)
    monkeypatch.setenv(kernels.FORCE_PLAIN, "1")
    assert torch.equal(kernels.rows_times(x, w), plain)


def test_how_a_few_rows_multiply_is_measured_once_per_shape_or_forced(monkeypatch):
    """Each float32 weight's shape is timed both ways on its first few-row product and keeps
    its way for the process (so the plain forward and the lean step keep multiplying alike);
    the environment forces either way; bfloat16 and FORCE_PLAIN never transpose. (Two rows take
    the float32 C loop first where the CPU takes it: turned off here.)"""
    monkeypatch.delenv(kernels.FEW_ENV, raising=False)
    monkeypatch.setenv(gemv.F32_ENV, "0")
    w, x = torch.randn(700, 96), torch.randn(2, 96)
    key = (*w.shape, torch.get_num_threads())
    kernels._FEW.pop(key, None)
    choice = kernels.few_rows_pay(w)
    assert kernels._FEW[key] is choice  # kept: asked again, not timed again
    for kept in (True, False):
        kernels._FEW[key] = kept
        assert kernels.few_rows_pay(w) is kept
        got = kernels.rows_times(x, w)
        assert torch.equal(got, (w @ x.T).T.contiguous() if kept else torch.nn.functional.linear(x, w))
    kernels._FEW.pop(key)
    assert not kernels.few_rows_pay(w.bfloat16())
    for forced, way in (("1", True), ("0", False)):
        monkeypatch.setenv(kernels.FEW_ENV, forced)
        assert kernels.few_rows_pay(w) is way and key not in kernels._FEW
    monkeypatch.setenv(kernels.FORCE_PLAIN, "1")
    monkeypatch.setenv(kernels.FEW_ENV, "1")
    assert not kernels.few_rows_pay(w)


def test_the_head_of_a_two_row_batch_gives_each_rows_logits(tiny):
    """The unembedding of two rows (a batch of two decoding together) equals each row alone
    to float32 rounding, to the bit where both take the float32 C loop; one row alone is the
    plain product (the C loop's where the CPU takes it)."""
    net = tiny  # the explorer is the network
    h = torch.randn(2, 1, net.embed.weight.shape[1])
    with torch.no_grad():  # as decoding runs (a product that records gradients is F.linear's)
        check_two_rows(net, h)


def check_two_rows(net, h):
    both = net._unembed(h)
    c_loop = gemv.available(torch.float32)
    for i in range(2):
        alone = net._unembed(h[i:i + 1])
        assert torch.equal(alone, gemv.gemv(h[i], net.embed.weight)[None] if c_loop else h[i:i + 1] @ net.embed.weight.T)
        if c_loop:
            assert torch.equal(both[i:i + 1], alone)
        torch.testing.assert_close(both[i:i + 1], alone, rtol=1e-5, atol=1e-5)


def test_rows_decoding_together_take_the_lean_step_bit_for_bit(tiny):
    """Two rows from one prompt (generate_batch's case) take one lean step together: each step
    equals the plain forward of both rows to the bit, past the window and the cache's growth."""
    from gemma3_lab.generate import decode_rows

    fast, plain = KVCache(tiny.config.text), KVCache(tiny.config.text)
    with torch.no_grad():
        for cache in (fast, plain):
            prefill(tiny, tiny.to_inputs(torch.tensor([[2, 17, 33, 5]])), cache)
            cache.repeat_rows(2)
        ids = [[7, 91]]
        for _ in range(70):
            a = decode_rows(tiny, ids[-1], fast, fast=True)
            b = decode_rows(tiny, ids[-1], plain, fast=False)
            assert a.shape == (2, 300) and torch.equal(a, b)
            ids.append([int(a[0].argmax()), int(a[1].topk(2).indices[1])])  # the rows part ways
    assert fast.paths == {"lean": 70} and plain.paths == {"plain": 70}
    assert decode_step(tiny, [1, 2, 3], fast) is None  # ids for rows the cache lacks: nothing done
    assert fast.length == plain.length


def test_a_cache_copy_goes_on_on_its_own(tiny):
    """`KVCache.copy` holds the same keys; steps on the copy leave the original where it was."""
    cache = KVCache(tiny.config.text)
    with torch.no_grad():
        prefill(tiny, tiny.to_inputs(torch.tensor([[2, 17, 33, 5, 8, 9]])), cache)
        twin = cache.copy()
        a = decode_one(tiny, 4, twin)
        for _ in range(10):
            decode_one(tiny, 4, twin)
        assert cache.length == 6 and twin.length == 17
        assert torch.equal(decode_one(tiny, 4, cache), a)
    for mine, theirs in zip(cache.layers, twin.layers):
        assert mine._k.data_ptr() != theirs._k.data_ptr()


@pytest.mark.parametrize("threads", [2, 3])
def test_a_gemv_cut_over_the_threads_is_the_plain_one_to_the_bit(threads):
    """`split_gemv` (one block of weight rows per thread) gives F.linear's bits where MKL runs
    a row's gemv on one thread (the CPUs where the cut is chosen: an AVX2 EPYC), rows not a
    multiple of the threads (nor of MKL's unroll) included, and too few rows to cut. Where MKL
    cuts the rows over its own threads (an AVX-512 Xeon), the rows at its cuts take another
    kernel, so F.linear's own last bits depend on the thread count; there the cut (only ever
    forced) agrees to float32 reordering."""
    before = torch.get_num_threads()
    g = torch.Generator().manual_seed(threads)
    try:
        for N, K in [(5000, 64), (4097, 640), (20001, 128), (37, 16)]:
            w, x = torch.randn(N, K, generator=g), torch.randn(1, K, generator=g)
            torch.set_num_threads(1)
            alone = torch.nn.functional.linear(x, w)
            torch.set_num_threads(threads)
            plain, cut = torch.nn.functional.linear(x, w), kernels.split_gemv(x, w)
            if torch.equal(plain, alone):  # MKL's threads do not cut this product's rows
                assert torch.equal(cut, plain), (N, K)
            else:
                torch.testing.assert_close(cut, plain, rtol=1e-5, atol=1e-5)
    finally:
        torch.set_num_threads(before)


def test_where_a_gemv_is_cut_is_measured_once_or_forced(monkeypatch):
    """Only a large float32 weight is timed both ways, once per shape; the environment forces
    either way; bfloat16 and FORCE_PLAIN never cut; `rows_times` follows the choice where the
    float32 C loop is not used (turned off here; where it is, it comes first)."""
    monkeypatch.delenv(kernels.SPLIT_ENV, raising=False)
    monkeypatch.setenv(gemv.F32_ENV, "0")
    big = torch.randn(kernels.SPLIT_MIN // 512, 512)
    kernels._SPLIT.clear()
    choice = kernels.split_pays(big)
    assert kernels._SPLIT[(*big.shape, torch.get_num_threads())] is choice  # kept: asked again, not timed again
    kernels._SPLIT[(*big.shape, torch.get_num_threads())] = not choice
    assert kernels.split_pays(big) is (not choice)
    kernels._SPLIT.clear()
    assert not kernels.split_pays(big[:1000]) and not kernels.split_pays(big.bfloat16())
    x = torch.randn(1, 1, 512)
    for forced, cut in (("1", True), ("0", False)):
        monkeypatch.setenv(kernels.SPLIT_ENV, forced)
        assert kernels.split_pays(big[:1000]) is cut
        calls = []
        monkeypatch.setattr(kernels, "split_gemv", lambda *a, real=kernels.split_gemv: calls.append(1) or real(*a))
        assert torch.equal(kernels.rows_times(x, big[:1000]), torch.nn.functional.linear(x, big[:1000]))
        assert calls == ([1] if cut else [])
        monkeypatch.undo()
        monkeypatch.delenv(kernels.SPLIT_ENV, raising=False)
        monkeypatch.setenv(gemv.F32_ENV, "0")
    monkeypatch.setenv(kernels.FORCE_PLAIN, "1")
    monkeypatch.setenv(kernels.SPLIT_ENV, "1")
    assert not kernels.split_pays(big)


def test_lean_and_plain_steps_keep_their_bits_with_the_head_cut(tiny, monkeypatch):
    """The head cut over the threads (forced: the tiny head is below where it is timed) or not,
    in the lean step and in the plain forward: lean and plain agree to the bit either way, and
    the cut gives the logits of no cut, to the bit where MKL's gemv does not cut the head's
    rows over its own threads (see the test above), else to float32 reordering. (The float32 C
    loop, which comes before the cut where the CPU takes it, is turned off.)"""
    monkeypatch.setenv(gemv.F32_ENV, "0")
    ids = torch.tensor([[2, 17, 33, 5, 80]])
    runs = []
    for forced in ("0", "1"):
        monkeypatch.setenv(kernels.SPLIT_ENV, forced)
        runs.append(greedy_steps(tiny, ids, 8, fast=False))
        assert torch.equal(greedy_steps(tiny, ids, 8, fast=True), runs[-1]), forced
    whole, cut = runs
    head, h = tiny.embed.weight.detach(), torch.randn(1, tiny.embed.weight.shape[1])
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    alone = torch.nn.functional.linear(h, head)
    torch.set_num_threads(before)
    if torch.equal(torch.nn.functional.linear(h, head), alone):
        assert torch.equal(cut, whole)
    else:
        torch.testing.assert_close(cut, whole, rtol=1e-5, atol=1e-5)


@pytest.mark.real
def test_the_real_head_cut_keeps_its_bits(real_model, monkeypatch):
    """The 270M's head, cut or not (the CPU's timing decides; both forced here, the C loop off): the same logits."""
    monkeypatch.setenv(gemv.F32_ENV, "0")
    ids = real_model.to_inputs(PROMPTS[1]).input_ids
    runs = []
    for forced in ("1", "0"):
        monkeypatch.setenv(kernels.SPLIT_ENV, forced)
        runs.append(greedy_steps(real_model, ids, 3, fast=True))
    assert torch.equal(*runs)
