"""run_with_cache options, bounded memory (bands, chunks, storage dtype, top-k logits, the
estimate and the budget), the logit lens, and capture during generation equal to one
run_with_cache over the final sequence, for text and image prompts."""

from __future__ import annotations

import pytest
import torch
from helpers import random_gemma

from gemma3_lab.config import Gemma3Config, TextConfig, VisionConfig, pattern_layer_types
from gemma3_lab.instrument.cache_estimate import CacheBudgetError
from gemma3_lab.model import explicit, native_decode
from gemma3_lab.model.banded import BandedPattern, BlockRows, concat_rows
from gemma3_lab.prompt.inputs import Inputs

BOI, EOI, IMG = 297, 298, 299
IMAGE = [BOI, IMG, IMG, IMG, IMG, EOI]


@pytest.fixture(scope="module")
def tiny():
    """Local window 3 (local, global, local, global), 4 heads on 2 kv heads, a small vision tower."""
    text = TextConfig(vocab_size=300, hidden_size=64, intermediate_size=96, num_layers=4, num_heads=4,
                      num_kv_heads=2, head_dim=16, query_pre_attn_scalar=16, sliding_window=3,
                      layer_types=pattern_layer_types(4, 2))
    vision = VisionConfig(hidden_size=32, intermediate_size=48, num_layers=1, num_heads=4, image_size=28, patch_size=7)
    config = Gemma3Config(text, vision, name="tiny-mm", mm_tokens_per_image=4, boi_token_id=BOI, eoi_token_id=EOI,
                          image_token_id=IMG)
    return random_gemma(config)


def _inputs(ids: list[int], n_images: int) -> Inputs:
    t = torch.tensor([ids])
    pixels = torch.randn(n_images, 3, 28, 28, generator=torch.Generator().manual_seed(3)) if n_images else None
    return Inputs(t, torch.ones_like(t), (t == IMG).long(), pixels)


PROMPT = [2, 10, 11, *IMAGE, 12, 13, *IMAGE, 14, 15, 16, 17, 18, 19, 20, 21, 22]  # 25 slots, images at 4-7, 13-16


def test_band_written_out():
    band = torch.tensor([[[[0.0, 1.0], [0.3, 0.7], [0.4, 0.6], [0.5, 0.5]]]])  # back = 1: (previous, self)
    p = BandedPattern(band, torch.arange(4), back=1, kv_start=0, kv_len=4)
    assert p.shape == (1, 1, 4, 4) and p.width == 2
    assert torch.equal(p.dense()[0, 0], torch.tensor([
        [1.0, 0.0, 0.0, 0.0],
        [0.3, 0.7, 0.0, 0.0],
        [0.0, 0.4, 0.6, 0.0],
        [0.0, 0.0, 0.5, 0.5],
    ]))
    scores = BandedPattern(band, torch.arange(4), 1, 0, 4, fill=-9.0)
    assert scores.dense()[0, 0, 0, 1] == -9.0 and scores.dense()[0, 0, 3, 0] == -9.0
    step = BandedPattern(torch.tensor([[[[0.2, 0.8]]]]), torch.tensor([4]), 1, 3, 2)  # a decode step at slot 4
    both = concat_rows([p, step], kv_len=5)
    assert torch.equal(both.dense()[0, 0, 4], torch.tensor([0.0, 0.0, 0.0, 0.2, 0.8]))
    assert torch.equal(both.dense()[0, 0, :4, :4], p.dense()[0, 0])


def test_chunked_explicit_path_equals_one_chunk(tiny, monkeypatch):
    """Global layers in chunks of 3 rows instead of one: layer 1 (the first global one, same
    input either way) gives the same scores and pattern to 1e-6, the logits agree to rounding."""
    x = _inputs(PROMPT, 2)
    names = ["blocks.1.attn.hook_pattern", "blocks.1.attn.hook_attn_scores", "blocks.1.attn.hook_mask"]
    one_logits, one = tiny.run_with_cache(x, names, full_logits=True)
    monkeypatch.setattr(explicit, "CHUNK_BYTES", 4 * 4 * len(PROMPT) * 3)
    monkeypatch.setattr(explicit, "MIN_ROWS", 1)  # chunks thinner than BLAS rounds like eager: the layout is tested here
    many_logits, many = tiny.run_with_cache(x, names, full_logits=True)
    # row blocks of another size round differently in the matmuls: ~1e-7 relative, carried to |logits| ~5
    assert (one_logits - many_logits).abs().max() <= 1e-5
    for name in one:
        a, b = one[name].to_dense(), many[name].to_dense()
        assert torch.equal(a, b) if a.dtype == torch.bool else torch.allclose(a, b, rtol=1e-6, atol=1e-6), name
    # in chunks the causal pattern keeps each block's reachable keys only: the triangle, plus
    # the rest of an image for its tokens
    blocks = many["pattern", 1]
    assert isinstance(blocks, BlockRows) and len(blocks.blocks) == 9
    assert blocks.nbytes < 0.7 * one["pattern", 1].numel() * 4
    rows = [20, 3, 4]
    assert torch.equal(blocks.select(heads=[2], rows=rows).dense(), blocks.dense()[:, [2]][:, :, rows])


def test_local_patterns_are_bands_reaching_forward_inside_images(tiny):
    _, cache = tiny.run_with_cache(_inputs(PROMPT, 2), ["blocks.0.attn.hook_pattern", "blocks.0.attn.hook_mask"])
    p = cache["pattern", 0]
    assert isinstance(p, BandedPattern) and p.back == 2 and p.width == 3 + 3  # window 3, then 3 later soft tokens
    dense = p.dense()
    assert (dense[~cache["mask", 0].expand_as(dense)] == 0).all()
    assert (dense[0, :, 4, 7] > 0).all()  # the first soft token hears its image's last one


def test_hooks_may_replace_mask_scores_and_pattern(tiny):
    """A replaced mask is the one used; a replaced pattern gives the output (z = pattern @ v)."""
    x = _inputs(PROMPT, 0)
    S = len(PROMPT)
    causal = torch.ones(S, S, dtype=torch.bool).tril()[None, None]

    def widen(m, hook):  # layer 0 is local (window 3): let it see everything before
        return causal

    with tiny.hooks([("blocks.0.attn.hook_mask", widen)]):
        _, cache = tiny.run_with_cache(x, ["blocks.0.attn.hook_pattern", "blocks.0.attn.hook_mask"], top_k=0)
    p = cache["pattern", 0]
    assert isinstance(p, torch.Tensor) and (p[0, :, -1, :-3] > 0).all()  # far keys now heard

    def uniform(p, hook):  # every allowed key alike
        m = causal.expand(p.shape).float()
        return m / m.sum(-1, keepdim=True)

    for layer in (0, 1):  # a band handed back dense (local), a dense one (global)
        with tiny.hooks([(f"blocks.{layer}.attn.hook_pattern", uniform)]):
            _, cache = tiny.run_with_cache(x, [f"blocks.{layer}.attn.hook_z", f"blocks.{layer}.attn.hook_v"], top_k=0)
        v = cache["v", layer].transpose(1, 2).repeat_interleave(2, dim=1)  # (B, N, T, H)
        want = (causal[0, 0].float() / causal[0, 0].sum(-1, keepdim=True)) @ v
        assert torch.allclose(cache["z", layer].transpose(1, 2), want, atol=1e-5), layer

    def doubled(s, hook):  # scores handed back dense: the softmax takes them as they are
        return s.to_dense() * 2

    with tiny.hooks([("blocks.0.attn.hook_attn_scores", doubled)]):
        _, cache = tiny.run_with_cache(x, ["blocks.0.attn.hook_pattern"], top_k=0)
    _, plain = tiny.run_with_cache(x, ["blocks.0.attn.hook_attn_scores"], top_k=0)
    want = torch.softmax(plain["attn_scores", 0].to_dense() * 2, dim=-1)
    assert torch.allclose(cache["pattern", 0].to_dense(), want, atol=1e-6)


def test_storage_dtype_keeps_the_logits(tiny, monkeypatch):
    x = _inputs(PROMPT, 2)
    names = ["blocks.*.attn.hook_pattern", "blocks.*.attn.hook_attn_scores"]
    full, c32 = tiny.run_with_cache(x, names, full_logits=True)
    for chunk_bytes, tol in ((explicit.CHUNK_BYTES, 0.0), (4 * 4 * len(PROMPT) * 5, 1e-5)):
        monkeypatch.setattr(explicit, "CHUNK_BYTES", chunk_bytes)
        half, c16 = tiny.run_with_cache(x, names, dtype=torch.bfloat16, full_logits=True)
        # the output is taken from the float32 rows (bfloat16 patterns would move it by ~1e-2);
        # in chunks the matmuls round differently, as in test_chunked_explicit_path_equals_one_chunk
        assert (half - full).abs().max() <= tol
        for n in c32:
            assert c16[n].dtype == torch.bfloat16
            assert torch.equal(c16[n].to_dense(), c32[n].to_dense().to(torch.bfloat16)), n


def test_filters_select_what_a_full_capture_holds(tiny):
    x = _inputs(PROMPT, 2)
    tiny.set_attention_path("explicit")  # in both runs, so layers not captured compute the same way
    try:
        _, full = tiny.run_with_cache(x)
        _, some = tiny.run_with_cache(x, "blocks.*", layers=[-1, 1], heads=[3], positions=[0, 5, -1])
    finally:
        tiny.set_attention_path("sdpa")
    assert {n.split(".")[1] for n in some} == {"1", "3"}
    pos = torch.tensor([0, 5, len(PROMPT) - 1])
    assert torch.equal(some.positions, pos) and some.heads == [3]
    assert torch.equal(some["resid_post", 1], full["resid_post", 1][:, pos])
    assert torch.equal(some["z", 3], full["z", 3][:, pos][:, :, [3]])
    assert torch.equal(some["k", 3], full["k", 3][:, pos][:, :, [1]])  # kv head 1 serves query heads 2, 3
    assert torch.equal(some["pattern", 1], full["pattern", 1][:, [3]][:, :, pos])
    assert torch.equal(some["pattern", 3].to_dense(), full["pattern", 3].to_dense()[:, [3]][:, :, pos])


def test_top_k_logits_and_returned_logits(tiny):
    x = _inputs(PROMPT, 2)
    full, cache = tiny.run_with_cache(x, "hook_logits", full_logits=True, top_k=5)
    assert torch.equal(cache["hook_logits"], full)
    last, lean = tiny.run_with_cache(x, "blocks.0.hook_resid_post", return_logits=False, top_k=5)
    assert last.shape == (1, 1, 300) and (last[0, 0] - full[0, -1]).abs().max() <= 1e-5
    top = torch.topk(full, 5)
    assert torch.equal(lean.top_logits.ids, top.indices) and (lean.top_logits.values - top.values).abs().max() <= 1e-5
    with pytest.raises(KeyError, match="full_logits=True"):
        lean["hook_logits"]


def test_estimate_bounds_the_cache_and_the_budget_refuses(tiny):
    x = _inputs(PROMPT, 2)
    est = tiny.estimate_cache_bytes(x, return_logits=False)
    _, cache = tiny.run_with_cache(x, return_logits=False)
    held = cache.memory_bytes()
    print(f"estimate {est.total} bytes, held {held}")
    assert held <= est.total <= 1.6 * held  # an upper bound, not a wild one
    with pytest.raises(CacheBudgetError, match=r"names_filter=.*dtype=torch.bfloat16") as err:
        tiny.run_with_cache(x, max_bytes=est.total // 2)
    assert "blocks.*." in str(err.value)  # names the largest parts
    half = cache.to(dtype=torch.bfloat16)
    assert half["resid_post", 0].dtype == torch.bfloat16 and half["mask", 0].dtype == torch.bool
    assert half.memory_bytes() < held


@pytest.mark.parametrize("n_new", [8])
def test_generation_capture_equals_one_run_with_cache_image_prompt(tiny, n_new):
    """Left to right across the window of 3 and past two images: every decode step's rows,
    stitched by absolute position, equal one forward over the final sequence."""
    x = _inputs(PROMPT, 2)
    names = ["blocks.*.attn.hook_pattern", "blocks.*.attn.hook_attn_scores", "blocks.*.attn.hook_mask",
             "blocks.*.hook_resid_post", "blocks.*.attn.hook_z", "vision.hook_embed", "hook_image_features"]
    res = tiny.generate(x, max_new_tokens=n_new, stop_ids=(), capture=names)
    _compare(tiny, res, names, x.pixel_values)


def _compare(model, res, names, pixels=None):
    ids = torch.tensor([res.prompt_ids + res.token_ids[:-1]])  # the last token is never fed back
    _, cache = model.run_with_cache(Inputs(ids, torch.ones_like(ids), (ids == model.config.image_token_id).long(),
                                           pixels), names, top_k=0)
    assert set(res.captures) == set(cache), set(res.captures) ^ set(cache)
    for name, cap in res.captures.items():
        if cap.layout.seq is not None:
            assert torch.equal(cap.positions, torch.arange(ids.shape[1]))
            # the prefill, then one forward per fed-back token where the steps were recorded as
            # they ran; where they ran fast, one forward of the fed-back tokens after the last
            assert len(list(cap)) == (2 if "plain" not in res.decode_paths else len(res.token_ids))
        got, want = cap.tensor().to_dense(), cache[name].to_dense()
        assert got.shape == want.shape, name
        if got.dtype == torch.bool:
            assert torch.equal(got, want), name
        else:  # a one-row decode step and a full forward differ by float32 kernel rounding only:
            # a few ulps of the largest entry (Gemma's residual stream reaches the hundreds)
            scale = float(want[want.isfinite()].abs().max())
            assert torch.allclose(got, want, rtol=1e-4, atol=1e-5 * max(scale, 1.0)), (name, (got - want).abs().max())


@pytest.mark.parametrize("fast", [True, False])
def test_generation_capture_equals_one_run_with_cache_text_prompt(tiny, fast):
    """A text prompt: the steps take the lean path (recorded after, in one forward) or the
    plain one (recorded as they run), and either way equal one forward over the final sequence."""
    x = _inputs([2, 10, 11, 12, 13, 14], 0)
    names = ["blocks.*.attn.hook_pattern", "blocks.*.attn.hook_attn_scores", "blocks.*.attn.hook_mask",
             "blocks.*.hook_resid_post", "blocks.*.attn.hook_z", "hook_embed"]
    res = tiny.generate(x, max_new_tokens=9, stop_ids=(), capture=names, fast=fast)
    one_row = "native" if native_decode.why_not(tiny) is None else "lean"  # the lean step's C form, where built
    assert res.decode_paths == {one_row if fast else "plain": 8}
    _compare(tiny, res, names)


@pytest.mark.real
def test_generation_capture_equals_one_run_with_cache_real(real_model):
    names = ["blocks.*.attn.hook_pattern", "blocks.*.attn.hook_mask", "blocks.*.hook_resid_post", "hook_embed"]
    res = real_model.generate("The three primary colours are", max_new_tokens=6, stop_ids=(), capture=names)
    _compare(real_model, res, names)
    cap = res.captures["blocks.0.hook_resid_post"]
    n = len(res.prompt_ids)
    assert torch.equal(cap[n], cap.tensor()[:, n])  # indexed by absolute position
    with pytest.raises(IndexError):
        cap[n + 5]  # the last generated token was never fed back


@pytest.mark.real
def test_logit_lens(real_model):
    prompt = "The capital of France is"
    logits, cache = real_model.run_with_cache(prompt, ["blocks.0.hook_resid_pre", "blocks.*.hook_resid_post"])
    lens = cache.logit_lens(k=5)
    n = real_model.config.text.num_layers
    S = logits.shape[1]
    assert lens.layer_labels == ["embed"] + [f"L{i}" for i in range(n)]
    assert lens.tokens == [real_model.tokenizer.id_to_token(i) for i in real_model.to_inputs(prompt).input_ids[0].tolist()]
    assert lens.top_ids.shape == lens.top_probs.shape == (n + 1, S, 5)
    assert len(lens.top_tokens) == n + 1 and len(lens.top_tokens[0]) == S and len(lens.top_tokens[0][0]) == 5
    # the last layer read through the final norm and head is the model's own prediction
    probs = torch.softmax(logits[0].float(), -1)
    assert torch.equal(lens.top_ids[-1], torch.topk(probs, 5).indices)
    # the head read in vocabulary chunks rounds logits of ~30 by a few float32 ulps (~1e-5): probabilities to 1e-4
    assert (lens.top_probs[-1] - torch.topk(probs, 5).values).abs().max() <= 1e-4
    assert (lens.top_probs.sum(-1) <= 1 + 1e-5).all() and lens.top_tokens[-1][-1][0] == "▁the"
    with pytest.raises(KeyError, match="hook_resid_post"):
        real_model.run_with_cache(prompt, "blocks.0.hook_resid_pre")[1].logit_lens()
