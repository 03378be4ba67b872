"""Chunked prefill (equal to one forward, stoppable between chunks) and batched generation
(each row equal to its own single `generate`: greedy, seeded sampling, an intervention in
one row only, per-row stopping, captures split per row)."""

from __future__ import annotations

import pytest
import torch
from helpers import random_gemma

from gemma3_lab.config import Gemma3Config, TextConfig, VisionConfig, pattern_layer_types
from gemma3_lab.generate import prefill, prefill_chunks
from gemma3_lab.generate_batch import RowSettings, generate_batch
from gemma3_lab.instrument.interventions import ablate_heads, for_row, steer
from gemma3_lab.model import native_decode
from gemma3_lab.model.kv_cache import KVCache
from gemma3_lab.prompt.inputs import Inputs

BOI, EOI, IMG = 297, 298, 299
PROMPT = [2, 10, 11, BOI, IMG, IMG, IMG, IMG, EOI, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24]


@pytest.fixture(scope="module")
def tiny():
    """Window 3 (local, global, local, global), 4 heads on 2 kv heads, a small vision tower."""
    text = TextConfig(vocab_size=300, hidden_size=64, intermediate_size=96, num_layers=4, num_heads=4,
                      num_kv_heads=2, head_dim=16, query_pre_attn_scalar=16, sliding_window=3,
                      layer_types=pattern_layer_types(4, 2))
    vision = VisionConfig(hidden_size=32, intermediate_size=48, num_layers=1, num_heads=4, image_size=28, patch_size=7)
    config = Gemma3Config(text, vision, name="tiny-mm", mm_tokens_per_image=4, boi_token_id=BOI, eoi_token_id=EOI,
                          image_token_id=IMG)
    return random_gemma(config)


def _inputs() -> Inputs:
    t = torch.tensor([PROMPT])
    pixels = torch.randn(1, 3, 28, 28, generator=torch.Generator().manual_seed(3))
    x = Inputs(t, torch.ones_like(t), (t == IMG).long(), pixels)
    return x


def test_prefill_chunks_keep_images_whole():
    from gemma3_lab.prompt.inputs import ImageSpan

    x = _inputs()
    assert prefill_chunks(x, None) == [(0, 22)] and prefill_chunks(x, 50) == [(0, 22)]
    assert prefill_chunks(x, 5) == [(0, 5), (5, 10), (10, 15), (15, 20), (20, 22)]
    x.image_spans.append(ImageSpan(0, 0, 0, 4, 8))
    assert prefill_chunks(x, 3) == [(0, 9), (9, 12), (12, 15), (15, 18), (18, 21), (21, 22)]


@pytest.mark.parametrize("chunk", [1, 3, 7])
def test_chunked_prefill_equals_one_forward(tiny, chunk):
    """Logits, and every captured pattern and residual, match one whole-prompt forward."""
    x = _inputs()
    whole = prefill(tiny, x, KVCache(tiny.config.text))
    with torch.no_grad():
        t = torch.tensor([PROMPT])
        ref = tiny(t, attention_mask=torch.ones_like(t), token_types=(t == IMG).long(),
                   pixel_values=x.pixel_values).logits[0, -1]
    # with the image inside one chunk, chunks of 1 and 3 still see it whole
    x.image_spans.clear()
    from gemma3_lab.prompt.inputs import ImageSpan

    x.image_spans.append(ImageSpan(0, 0, 0, 4, 8))
    got = prefill(tiny, x, KVCache(tiny.config.text), chunk=chunk)
    assert torch.allclose(whole, ref, atol=1e-5) and torch.allclose(got, ref, atol=1e-4)
    names = ["blocks.*.attn.hook_pattern", "blocks.*.hook_resid_post", "blocks.*.attn.hook_mask"]
    res = tiny.generate(x, max_new_tokens=3, stop_ids=(), capture=names, prefill_chunk=chunk)
    ids = torch.tensor([res.prompt_ids + res.token_ids[:-1]])
    _, cache = tiny.run_with_cache(Inputs(ids, torch.ones_like(ids), (ids == IMG).long(), x.pixel_values), names)
    for name, cap in res.captures.items():
        a, b = cap.tensor().to_dense(), cache[name].to_dense()
        assert torch.equal(a, b) if a.dtype == torch.bool else torch.allclose(a.float(), b.float(), atol=1e-4), name


def test_stop_during_the_prefill(tiny):
    calls = []

    def stop():
        calls.append(1)
        return len(calls) >= 2  # after the second chunk

    res = tiny.generate(_inputs(), max_new_tokens=5, should_stop=stop, prefill_chunk=10, images=None)
    assert res.stop_reason == "stopped" and res.steps == [] and len(calls) == 2


def test_for_row_touches_one_row_only():
    (name, fn), = for_row(ablate_heads(0, [1]), 1)
    z = torch.randn(2, 3, 4, 5)
    out = fn(z, None)
    assert torch.equal(out[0], z[0]) and torch.equal(out[1, :, 1], torch.zeros(3, 5))
    assert torch.equal(out[1, :, 0], z[1, :, 0])


def _single(model, prompt, s: RowSettings, **kw):
    with model.hooks(list(s.hooks)):
        return model.generate(prompt, max_new_tokens=s.max_new_tokens, do_sample=s.do_sample, temperature=s.temperature,
                              top_k=s.top_k, top_p=s.top_p, seed=s.seed, **kw)


def test_rows_equal_single_runs_tiny(tiny):
    """Greedy, seeded sampling and an ablation in row 1: each row is its own single run; the
    captures are split per row; rows stop on their own lengths."""
    x = _inputs()
    rows = [RowSettings(max_new_tokens=6), RowSettings(max_new_tokens=4, do_sample=True, temperature=0.9, seed=5,
                                                       hooks=tuple(ablate_heads(1, [0, 3])))]
    names = ["blocks.*.attn.hook_pattern", "blocks.*.hook_resid_post"]
    got = generate_batch(tiny, x, rows, stop_ids=(), capture=names)
    for r, s in enumerate(rows):
        want = _single(tiny, x, s, stop_ids=(), capture=names)
        assert got[r].token_ids == want.token_ids and got[r].stop_reason == want.stop_reason
        assert got[r].decode_paths == want.decode_paths == {"plain": len(want.token_ids) - 1}  # captured: plain
        assert [st.logprob for st in got[r].steps] == pytest.approx([st.logprob for st in want.steps], abs=1e-4)
        for name, cap in want.captures.items():
            mine = got[r].captures[name]
            assert torch.equal(mine.positions, cap.positions), name
            assert torch.allclose(mine.tensor().to_dense(), cap.tensor().to_dense(), atol=1e-4), name


@pytest.mark.real
def test_rows_equal_single_runs_real(real_model):
    prompt = "The capital of France is"
    plain = RowSettings(max_new_tokens=8)
    sampled = RowSettings(max_new_tokens=8, do_sample=True, temperature=0.8, top_k=40, seed=7)
    ablated = RowSettings(max_new_tokens=8, hooks=tuple(ablate_heads(0, [0, 1, 2, 3])))
    steered = RowSettings(max_new_tokens=8, hooks=tuple(steer("blocks.6.hook_resid_post", torch.ones(640), 8.0)))
    for pair in ([plain, sampled], [plain, ablated], [steered, plain]):
        got = generate_batch(real_model, prompt, pair)
        for r, s in enumerate(pair):
            assert got[r].token_ids == _single(real_model, prompt, s).token_ids
    assert got[0].token_ids != got[1].token_ids  # the steered row changed, the plain one did not


def test_stop_ends_every_row(tiny):
    seen = []
    res = generate_batch(tiny, _inputs(), [RowSettings(max_new_tokens=50)] * 2, stop_ids=(),
                         on_token=lambda r, s: seen.append((r, s.index)), should_stop=lambda: len(seen) >= 4)
    assert [r.stop_reason for r in res] == ["stopped", "stopped"] and seen == [(0, 0), (1, 0), (0, 1), (1, 1)]


def test_generation_builds_no_autograd_graph(tiny):
    """generate and generate_batch run without autograd even on a model whose weights require
    grad (a random or freshly loaded one): no step keeps a graph alive."""
    assert any(p.requires_grad for p in tiny.parameters())
    seen = []
    with tiny.hooks([("blocks.0.hook_resid_post", lambda t, hook: seen.append(torch.is_grad_enabled()))]):
        tiny.generate(_inputs(), max_new_tokens=3)
        generate_batch(tiny, _inputs(), [RowSettings(max_new_tokens=3)] * 2)
    assert len(seen) >= 4 and not any(seen)


def test_rows_with_nothing_hooked_take_the_lean_step(tiny):
    """A text prompt, no intervention: the rows decode together through the lean step (equal
    to the plain one to the bit: `test_rows_decoding_together_take_the_lean_step_bit_for_bit`),
    and a capture does not send them to the plain path: the prompt is recorded as it runs,
    each row's fed tokens in one forward after, equal to recording every step up to float
    rounding, and so are the chosen tokens and their log-probabilities."""
    x = torch.tensor([[2, 10, 11, 12, 13, 14, 15, 16]])
    rows = [RowSettings(max_new_tokens=9), RowSettings(max_new_tokens=6, do_sample=True, seed=3)]
    names = ["blocks.*.attn.hook_pattern", "blocks.*.hook_resid_post", "hook_logits"]
    fast = generate_batch(tiny, x, rows, stop_ids=(), capture=names)
    plain = generate_batch(tiny, x, rows, stop_ids=(), capture=names, fast=False)
    for f, p, s in zip(fast, plain, rows):
        assert f.token_ids == p.token_ids and len(f.token_ids) == s.max_new_tokens
        # a recorded pattern runs explicit attention: the two differ by float rounding only
        assert [st.logprob for st in f.steps] == pytest.approx([st.logprob for st in p.steps], abs=1e-5)
        rows_step = "native" if native_decode.why_not(tiny) is None else "lean"  # the lean step in C, where built
        assert f.decode_paths == {rows_step: s.max_new_tokens - 1} and p.decode_paths == {"plain": s.max_new_tokens - 1}
        for name, cap in p.captures.items():
            mine = f.captures[name]
            assert len(list(mine)) == 2 and len(list(cap)) == s.max_new_tokens  # prefill + one forward
            assert torch.equal(mine.positions, cap.positions), name
            torch.testing.assert_close(mine.tensor().to_dense(), cap.tensor().to_dense(), rtol=1e-4, atol=1e-5)
