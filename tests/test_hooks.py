"""Hook points and the hook API on the real bundled 270M: every name the issue lists, the
exact mask each layer used (checked against masks written out here from first principles,
for text and for an image prompt), patterns, the banded local path, and fast vs
instrumented agreement (with transformers as the yardstick)."""

from __future__ import annotations

import pytest
import torch

from gemma3_lab.config import AttentionType
from gemma3_lab.model.banded import BandedPattern

pytestmark = pytest.mark.real

S = 700  # longer than the 512 window, so local and global layers really differ


def first_principles(n: int, window: int | None, image_spans=()) -> torch.Tensor:
    """(n, n) may-attend, written out: causal; both ways inside one image; a local layer
    also needs the key fewer than `window` slots back (forwards inside an image is fine)."""
    i = torch.arange(n)[:, None]
    j = torch.arange(n)[None, :]
    allowed = j <= i
    for a, b in image_spans:
        allowed[a:b, a:b] = True
    if window is not None:
        allowed &= (i - j) < window
    return allowed


@pytest.fixture(scope="module")
def ids(real_model, long_prompt):
    x = real_model.to_inputs(long_prompt).input_ids[:, :S]
    assert x.shape[1] == S
    return x


ATTN = ["hook_mask", "hook_pattern", "hook_rot_q", "hook_rot_k", "hook_v", "hook_z"]


@pytest.fixture(scope="module")
def captured(real_model, ids):
    """One instrumented forward (patterns hooked: the explicit path) capturing the attention sites."""
    return real_model.run_with_cache(ids, [f"blocks.*.attn.{n}" for n in ATTN], top_k=0)


def test_every_named_site_exists(real_model):
    names = set(real_model.hook_names())
    per_layer = [
        "hook_resid_pre", "hook_resid_mid", "hook_resid_post", "hook_attn_out", "hook_mlp_out",
        "attn.hook_q", "attn.hook_k", "attn.hook_v", "attn.q_norm.hook_normalized", "attn.k_norm.hook_normalized",
        "attn.hook_rot_q", "attn.hook_rot_k", "attn.hook_attn_scores", "attn.hook_mask", "attn.hook_pattern",
        "attn.hook_z", "attn.hook_out", "mlp.hook_pre", "mlp.hook_pre_linear", "mlp.hook_post",
    ] + [f"{norm}.{h}" for norm in ("pre_attention_norm", "post_attention_norm", "pre_ffw_norm", "post_ffw_norm")
         for h in ("hook_in", "hook_scale", "hook_normalized")]
    top = ["hook_embed", "hook_embed_scaled", "hook_inputs_embeds", "final_norm.hook_in", "final_norm.hook_scale",
           "final_norm.hook_normalized", "hook_logits", "hook_image_features", "hook_slots"]
    n = real_model.config.text.num_layers
    missing = [f"blocks.{i}.{p}" for i in range(n) for p in per_layer if f"blocks.{i}.{p}" not in names]
    assert not missing and set(top) <= names, (missing, set(top) - names)
    # TransformerLens' names for the norms resolve to Gemma's
    assert real_model.hook_point("blocks.2.ln1.hook_scale") is real_model.hook_point("blocks.2.pre_attention_norm.hook_scale")
    assert real_model.hook_point("blocks.2.ln2_post.hook_normalized").name == "blocks.2.post_ffw_norm.hook_normalized"
    assert real_model.hook_point("ln_final.hook_normalized").name == "final_norm.hook_normalized"


def test_unknown_names_suggest_the_nearest(real_model):
    with pytest.raises(KeyError, match="did you mean blocks.3.attn.hook_pattern"):
        real_model.hook_point("blocks.3.attn.hook_patern")
    with pytest.raises(ValueError, match="hook_resid_post"):
        real_model.run_with_cache("Hi", names_filter=["blocks.0.hook_resid_pots"])
    with pytest.raises(KeyError, match="did you mean blocks.0.hook_mlp_out"):
        with real_model.hooks([("blocks.0.hook_mlp_ot", lambda t, hook: None)]):
            pass
    with pytest.raises(ValueError, match="did you mean"):  # before anything is generated
        real_model.generate("Hi", max_new_tokens=1, capture=["blocks.0.attn.hook_zz"])


def test_a_raising_hook_leaves_no_hook_behind(real_model):
    def boom(t, hook):
        raise RuntimeError("hook failed")

    with pytest.raises(RuntimeError, match="hook failed"):
        real_model.run_with_hooks("Hi", fwd_hooks=[("blocks.0.hook_resid_pre", lambda t, hook: None),
                                                   ("blocks.4.attn.hook_z", boom)])
    with pytest.raises(KeyError):  # a bad name after a good one: the good one is removed too
        with real_model.hooks([("blocks.1.hook_resid_pre", boom), ("nope", boom)]):
            pass
    assert not any(hp.active for hp in real_model.hook_points.values())


def test_hook_mask_is_the_first_principles_mask(real_model, captured):
    _, cache = captured
    cfg = real_model.config.text
    assert cfg.sliding_window == 512
    local, full = first_principles(S, 512), first_principles(S, None)
    assert not torch.equal(local, full)
    for i, t in enumerate(cfg.layer_types):
        expected = local if t is AttentionType.LOCAL_SLIDING else full
        assert torch.equal(cache["mask", i][0, 0], expected), f"layer {i}"


def test_patterns_are_distributions_zero_where_masked(real_model, captured):
    _, cache = captured
    for i, t in enumerate(real_model.config.text.layer_types):
        p = cache["pattern", i]
        assert isinstance(p, BandedPattern) == (t is AttentionType.LOCAL_SLIDING)
        assert p.shape == (1, 4, S, S)
        dense = p.to_dense()  # a tensor's to_dense() is itself
        assert (dense.sum(-1) - 1).abs().max() <= 1e-5
        assert (dense[~cache["mask", i].expand_as(dense)] == 0).all()


def test_band_is_exact_and_matches_the_dense_explicit_path(real_model, captured):
    """Layer 0 keeps (T, 512) bands: `.dense()` places each entry exactly; the band's
    numerics equal eager attention computed densely here to 1e-6."""
    _, cache = captured
    band = cache["pattern", 0]
    assert band.band.shape == (1, 4, S, 512) and band.back == 511
    dense = band.dense()
    for row in (0, 100, 511, 512, S - 1):
        for j in (0, 7, 511):
            key = row - 511 + j
            want = band.band[0, :, row, j] if key >= 0 else torch.zeros(4)
            if key >= 0:
                assert torch.equal(dense[0, :, row, key], want)
    assert int((dense != 0).sum()) == int((band.band != 0).sum())  # nothing lost, nothing invented
    attn = real_model.blocks[0].attn
    q = cache["blocks.0.attn.hook_rot_q"].transpose(1, 2)  # (B, N, S, H)
    k = cache["blocks.0.attn.hook_rot_k"].transpose(1, 2).repeat_interleave(4, dim=1)
    v = cache["blocks.0.attn.hook_v"].transpose(1, 2).repeat_interleave(4, dim=1)
    scores = q @ k.transpose(2, 3) * attn.scale
    scores = scores.masked_fill(~first_principles(S, 512), torch.finfo(scores.dtype).min)
    eager = torch.softmax(scores, dim=-1)
    assert (dense - eager).abs().max() <= 1e-6
    z = cache["blocks.0.attn.hook_z"].transpose(1, 2)
    # the output sums ~512 products of a different length and order: float32 rounding of |v| up to ~17
    assert (z - eager @ v).abs().max() <= 4e-6 * v.abs().max()


def test_fast_and_instrumented_agree(real_model, ids, captured, hf_eager, hf_sdpa):
    instrumented = captured[0]
    with torch.no_grad():
        fast = real_model(ids).logits
        eager = hf_eager(input_ids=ids).logits
        drift = (eager - hf_sdpa(input_ids=ids).logits).abs().max()
    d = (fast - instrumented).abs().max()
    print(f"fast vs instrumented {d:.3g}; transformers eager vs sdpa {drift:.3g}; "
          f"instrumented vs eager {(instrumented - eager).abs().max():.3g}")
    assert torch.equal(fast.argmax(-1), instrumented.argmax(-1))
    assert d <= drift
    assert (instrumented - eager).abs().max() <= 1e-4


def test_greedy_tokens_identical_with_patterns_captured(real_model):
    prompt = "The history of the printing press begins"
    plain = real_model.generate(prompt, max_new_tokens=12, stop_ids=())
    hooked = real_model.generate(prompt, max_new_tokens=12, stop_ids=(), capture="blocks.*.attn.hook_pattern")
    assert plain.token_ids == hooked.token_ids
    assert max(abs(a.logprob - b.logprob) for a, b in zip(plain.steps, hooked.steps)) <= 1e-4


def test_hooks_that_do_not_capture_patterns_keep_the_fast_path(real_model, monkeypatch):
    import gemma3_lab.model.attention as attention

    def explicit(*args, **kwargs):
        raise AssertionError("the explicit path was taken")

    monkeypatch.setattr(attention, "explicit_attention", explicit)
    with torch.no_grad():
        real_model("Hi there")
        real_model.run_with_cache("Hi there", ["blocks.*.hook_resid_post", "blocks.*.attn.hook_mask",
                                               "blocks.*.attn.hook_z"])
    with pytest.raises(AssertionError, match="explicit path"):
        real_model.run_with_cache("Hi there", "blocks.3.attn.hook_pattern")


@pytest.fixture(scope="module")
def demo():
    import gemma3_lab as gl

    return gl.load("demo-multimodal", progress=False)


def _picture(seed: int):
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (64, 96, 3), dtype=np.uint8))


def test_hook_mask_on_an_image_prompt(demo, long_prompt):
    """Two images and text around them, ~770 slots: images see themselves both ways, never a
    later image; local layers still cut every query (image tokens too) 512 slots back."""
    text = f"{long_prompt[:800]} <start_of_image> {long_prompt[800:1000]} <start_of_image> What is shown?"
    x = demo.processor(text, images=[_picture(0), _picture(1)])
    n = x.input_ids.shape[1]
    spans = [(s.start, s.end) for s in x.image_spans]
    assert len(spans) == 2 and n > 512 + spans[0][0]
    assert all(bool((x.input_ids[0, a:b] == demo.config.image_token_id).all()) for a, b in spans)
    names = set(demo.hook_names())
    assert {"vision.blocks.0.attn.hook_pattern", "vision.hook_post_layernorm", "projector.hook_pooled",
            "projector.hook_out", "hook_image_features", "hook_inputs_embeds"} <= names
    _, cache = demo.run_with_cache(x, "blocks.*.attn.hook_mask", return_logits=False, top_k=0)
    local, full = first_principles(n, 512, spans), first_principles(n, None, spans)
    for i, t in enumerate(demo.config.text.layer_types):
        expected = local if t is AttentionType.LOCAL_SLIDING else full
        assert torch.equal(cache["mask", i][0, 0], expected), f"layer {i}"


def test_hook_point_shortcut_keeps_every_kind_of_hook():
    """A bare HookPoint skips nn.Module.__call__; forward, backward and global hooks still fire."""
    from gemma3_lab.model.hook_point import HookPoint

    h = HookPoint()
    x = torch.ones(3, requires_grad=True)
    assert h(x) is x
    grads, seen = [], []
    h.register_full_backward_hook(lambda m, gi, go: grads.append(go[0].clone()))
    (h(x * 2) * 3).sum().backward()
    assert len(grads) == 1 and torch.equal(grads[0], torch.full((3,), 3.0))
    handle = torch.nn.modules.module.register_module_forward_hook(lambda m, i, o: seen.append(m))
    try:
        bare = HookPoint()
        bare(torch.ones(1))
    finally:
        handle.remove()
    assert seen == [bare]
