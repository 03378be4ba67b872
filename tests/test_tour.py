"""gemma3_lab.tour: the facts the architecture tour prints, checked against the model itself."""

from __future__ import annotations

import math

import pytest
import torch

import gemma3_lab as gl
from gemma3_lab import tour
from gemma3_lab.config import Gemma3Config, RopeConfig, TextConfig, pattern_layer_types


def tiny(layer_types, window: int = 2) -> gl.Gemma3:
    """A random 2-layer model; both RoPE tables equal, so local and global differ only by mask."""
    torch.manual_seed(0)
    text = TextConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2, num_kv_heads=1,
                      head_dim=16, query_pre_attn_scalar=16, sliding_window=window, layer_types=layer_types,
                      rope_global=RopeConfig(10_000.0), max_position_embeddings=64)
    model = gl.Gemma3(Gemma3Config(text, name="tiny")).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:  # norm offsets w: away from zero so (1 + w) is visible
                p.normal_(0, 0.3)
    return model


def test_window_hooks_make_a_global_layer_local():
    a = tiny(pattern_layer_types(2, 2))  # layer 1 global
    b = tiny((gl.AttentionType.LOCAL_SLIDING,) * 2)
    b.load_state_dict(a.state_dict())
    ids = torch.arange(1, 9)[None]
    with torch.no_grad():
        plain = a(ids).logits
        with a.hooks(tour.window_hooks(a, a.config.text.global_layers)):
            narrowed = a(ids).logits
        local = b(ids).logits
    assert not torch.allclose(plain, local, atol=1e-4)  # the window matters on 8 tokens
    torch.testing.assert_close(narrowed, local)
    with torch.no_grad():  # hooks are gone afterwards
        torch.testing.assert_close(a(ids).logits, plain)


def test_norm_gains_are_one_plus_w():
    m = tiny(pattern_layer_types(2, 2))
    g = tour.norm_gains(m)
    w = m.blocks[1].post_ffw_norm.weight.detach()
    assert g.mean["post_ffw_norm"][1].item() == pytest.approx(float((1 + w).mean()), rel=1e-6)
    assert g.max["q_norm"][0].item() == pytest.approx(float((1 + m.blocks[0].attn.q_norm.weight.detach()).max()), rel=1e-6)
    assert g.final[1] == pytest.approx(float((1 + m.final_norm.weight.detach()).min()), rel=1e-6)
    assert set(g.mean) == set(tour.NORMS + tour.QK_NORMS) and len(g.mean["pre_ffw_norm"]) == 2


def test_parameter_breakdown_and_kv_bytes():
    m = tiny(pattern_layer_types(2, 2))
    parts = tour.parameter_breakdown(m)
    assert sum(parts.values()) == m.num_parameters()
    assert parts["embedding (= tied head)"] == 64 * 32
    assert parts["norms"] == 2 * (4 * 32 + 2 * 16) + 32
    assert tour.kv_bytes_per_token(m.config) == 2 * 2 * 1 * 16 * 4
    assert tour.kv_bytes_per_token(gl.PRESETS["gemma-3-4b"], torch.bfloat16) == 2 * 34 * 4 * 256 * 2


def test_rope_wavelengths():
    m = tiny(pattern_layer_types(2, 2))
    w = tour.rope_wavelengths(m)
    H = 16
    expect = torch.tensor([2 * math.pi * 10_000 ** (2 * i / H) for i in range(H // 2)], dtype=torch.float64)
    torch.testing.assert_close(w["local"], expect, rtol=1e-5, atol=0)
    assert tour.full_turns_within(m, 7) == {"local": 1, "global": 1}  # only 2π ≈ 6.3 fits
    assert tour.full_turns_within(m, 10**9) == {"local": 8, "global": 8}


def test_attention_mass_and_beyond_window():
    S = 5
    p = torch.tril(torch.ones(S, S))
    p = (p / p.sum(-1, keepdim=True))[None, None].repeat(1, 2, 1, 1)  # uniform causal, 2 heads
    assert tour.attention_mass(p, 4, [0, 1]).tolist() == pytest.approx([0.4, 0.4])
    assert tour.attention_mass(p, [3, 4], 0).tolist() == pytest.approx([(1 / 4 + 1 / 5) / 2] * 2)
    # window 3: queries 3 and 4 have keys >= 3 back: {0} (of 4) and {0, 1} (of 5)
    assert tour.mass_beyond_window(p, 3).tolist() == pytest.approx([(1 / 4 + 2 / 5) / 2] * 2)
    assert tour.mass_beyond_window(p, 3, first_key=1).tolist() == pytest.approx([(0 + 1 / 5) / 2] * 2)
    assert torch.isnan(tour.mass_beyond_window(p, 9)).all()


@pytest.mark.real
def test_find_tokens(real_model):
    ids = real_model.tokenizer.encode("The ship is called the Heliotrope today", add_bos=True)
    pos = tour.find_tokens(real_model, ids, " Heliotrope")
    assert real_model.tokenizer.decode([ids[i] for i in pos]) == " Heliotrope"
    with pytest.raises(ValueError, match="does not occur"):
        tour.find_tokens(real_model, ids, " Nautilus")


@pytest.mark.real
def test_token_journey_real(real_model):
    prompt = "The capital of France is"
    j = tour.token_journey(real_model, prompt)
    t = real_model.config.text
    assert j.token == "▁is" and j.position == 5
    assert j.scaled_norm == pytest.approx(j.embed_norm * math.sqrt(t.hidden_size), rel=1e-5)
    assert j.tied_head_error < 1e-3
    for a in (j.resid_pre, j.attn_out, j.mlp_out, j.resid_post):
        assert a.shape == (t.num_layers,)
    assert j.q_raw.shape == (t.num_layers, t.num_heads) and j.k_normed.shape == (t.num_layers, t.num_kv_heads)
    _, cache = real_model.run_with_cache(prompt, names_filter="blocks.17.hook_resid_post")
    assert j.resid_post[-1].item() == pytest.approx(float(cache["resid_post", 17][0, -1].norm()), rel=1e-5)
    with torch.no_grad():
        logits = real_model(prompt).logits[0, -1]
    assert real_model.tokenizer.id_to_token(int(logits.argmax())) == j.top[0][0]
    first = tour.token_journey(real_model, prompt, position=0)
    assert first.token == "<bos>"


@pytest.mark.real
def test_plots_draw(real_model):
    pytest.importorskip("matplotlib")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    m = tiny(pattern_layer_types(2, 2))
    for fig in (tour.plot_norm_gains(tour.norm_gains(m)), tour.plot_rope(m),
                tour.plot_journey(tour.token_journey(real_model, "Hello there"))):
        assert fig.axes
        plt.close(fig)
