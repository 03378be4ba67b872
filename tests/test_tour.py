"""gemma3_lab.analysis.tour: the facts the architecture tour prints, checked against the model itself."""

from __future__ import annotations

import math

import pytest
import torch

import gemma3_lab as gl
from gemma3_lab.analysis import tour
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
    q = m.blocks[0].attn.q_norm.weight.detach()
    assert g.max["q_norm"][0].item() == pytest.approx(float((1 + q).max()), rel=1e-6)
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


# ------------------------------------------------------------------------------ sweeps
def _last_logit_gap(logits):
    return (logits[:, 3] - logits[:, 4]).double()


def test_head_ablation_sweep_cells_equal_single_ablations():
    m = tiny(pattern_layer_types(2, 2))
    ids = torch.tensor([[1, 5, 9, 3, 7, 2]])
    sweep = tour.head_ablation_sweep(m, ids, _last_logit_gap)
    assert sweep.values.shape == (2, 2)
    with torch.no_grad():
        assert sweep.baseline == pytest.approx(float(_last_logit_gap(m(ids).logits[:, -1])[0]), abs=1e-5)
        for layer in range(2):
            for head in range(2):
                def zero(z, hook, head=head):
                    z = z.clone()
                    z[:, :, head] = 0.0
                    return z

                with m.hooks([(f"blocks.{layer}.attn.hook_z", zero)]):
                    one = float(_last_logit_gap(m(ids).logits[:, -1])[0])
                assert sweep.values[layer, head].item() == pytest.approx(one, abs=1e-5)
    torch.testing.assert_close(sweep.effect, sweep.values - sweep.baseline)


def test_patching_sweep_cells_equal_single_patches():
    m = tiny(pattern_layer_types(2, 2))
    clean = torch.tensor([[1, 5, 9, 3, 7, 2]])
    corrupt = torch.tensor([[1, 5, 11, 3, 7, 2]])
    sweep = tour.patching_sweep(m, clean, corrupt, _last_logit_gap)
    assert sweep.values.shape == (2, 6) and sweep.cols[2] == "11→9"
    _, cache = m.run_with_cache(clean, names_filter="blocks.*.hook_resid_pre")
    with torch.no_grad():
        for layer, pos in [(0, 2), (1, 5), (1, 0)]:
            def put(x, hook, layer=layer, pos=pos):
                x = x.clone()
                x[:, pos] = cache["resid_pre", layer][:, pos]
                return x

            with m.hooks([(f"blocks.{layer}.hook_resid_pre", put)]):
                one = float(_last_logit_gap(m(corrupt).logits[:, -1])[0])
            assert sweep.values[layer, pos].item() == pytest.approx(one, abs=1e-5)
    # only the changed token differs before layer 0: patching it there restores the clean run
    # (compared as metric values: a batched and a single-row float32 forward round apart by ~1e-6,
    # which the share-of-gap ratio magnifies when the gap is small)
    assert sweep.values[0, 2].item() == pytest.approx(sweep.reference, abs=1e-5)
    torch.testing.assert_close(sweep.values[0, [0, 1, 3, 4, 5]], torch.full((5,), sweep.baseline, dtype=torch.float64),
                               atol=1e-5, rtol=0)
    assert abs(sweep.reference - sweep.baseline) > 1e-3  # the gap is real, so the checks above can fail
    with pytest.raises(ValueError, match="same length"):
        tour.patching_sweep(m, clean, corrupt[:, :4], _last_logit_gap)


@pytest.mark.real
def test_logit_diff_and_token_id(real_model):
    rome = tour.token_id(real_model, " Rome")
    assert real_model.tokenizer.id_to_token(rome) == "▁Rome"
    with pytest.raises(ValueError, match="not one"):
        tour.token_id(real_model, " Heliotrope")
    logits = torch.zeros(2, real_model.config.text.vocab_size)
    logits[:, rome] = 3.0
    assert tour.logit_diff(real_model, " Rome", " Madrid")(logits).tolist() == [3.0, 3.0]


# ------------------------------------------------------------------------------ steps
@pytest.fixture(scope="module")
def three_runs(real_model):
    from gemma3_lab.instrument import interventions

    prompt = "Once upon a time"
    greedy = real_model.generate(prompt, max_new_tokens=5)
    sampled = real_model.generate(prompt, max_new_tokens=5, do_sample=True, temperature=1.5, seed=3)
    vector = tour.steering_vector(real_model, 6, " dragon", " the")
    hooks = interventions.steer("blocks.6.hook_resid_post", vector, 0.3)
    with real_model.hooks(hooks):
        steered = real_model.generate(prompt, max_new_tokens=5)
    return greedy, sampled, steered, hooks, vector


@pytest.mark.real
def test_steering_vector_is_a_difference_of_activations(real_model, three_runs):
    vector = three_runs[4]
    _, a = real_model.run_with_cache(" dragon", names_filter="blocks.6.hook_resid_post")
    _, b = real_model.run_with_cache(" the", names_filter="blocks.6.hook_resid_post")
    torch.testing.assert_close(vector, (a["resid_post", 6][0, -1] - b["resid_post", 6][0, -1]).float())


@pytest.mark.real
def test_tables_mark_the_divergence(three_runs):
    greedy, sampled, steered, _, _ = three_runs
    runs = {"greedy": greedy, "sampled": sampled, "steered": steered}
    lines = tour.step_table(runs).splitlines()
    assert len(lines) == 2 + 5 and lines[0].split()[:2] == ["step", "greedy"]
    parts = [greedy.first_divergence(r) for r in (sampled, steered)]
    for i, line in enumerate(lines[2:]):
        expect = sum(p is not None and i >= p for p in parts)
        assert line.count(tour.steps.DIVERGED) == expect, line
    d = parts[0]
    report = tour.divergence_report(greedy, sampled, ("g", "s"))
    if d is None:
        assert "same" in report
    else:
        assert f"step {d}" in report and repr(sampled.steps[d].token) in report
    assert "same 5 tokens" in tour.divergence_report(greedy, greedy)
    table = tour.top_k_table(greedy, k=2).splitlines()
    assert len(table) == 6 and repr(greedy.steps[0].top_k[1][0]) in table[1]


@pytest.mark.real
def test_forced_effect_replays_recorded_probabilities(real_model, three_runs):
    greedy, _, steered, hooks, _ = three_runs
    plain = tour.forced_effect(real_model, greedy, hooks)
    torch.testing.assert_close(plain.p_plain, torch.tensor([s.prob for s in greedy.steps]), atol=1e-4, rtol=0)
    assert plain.top_plain == [s.token for s in greedy.steps]  # greedy chose the top-1 every time
    replay = tour.forced_effect(real_model, steered, hooks)
    torch.testing.assert_close(replay.p_hooked, torch.tensor([s.prob for s in steered.steps]), atol=1e-4, rtol=0)
    assert replay.top_hooked == [s.token for s in steered.steps]
    assert (plain.kl >= -1e-6).all() and len(plain.table().splitlines()) == 6
    # no hooks: nothing changes
    same = tour.forced_effect(real_model, greedy, [])
    assert same.kl.abs().max() < 1e-6


@pytest.mark.real
def test_step_plots_draw(three_runs):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    greedy, sampled, steered, _, _ = three_runs
    m = tiny(pattern_layer_types(2, 2))
    ids = torch.tensor([[1, 5, 9, 3, 7, 2]])
    for fig in (tour.plot_steps({"a": greedy, "b": sampled, "c": steered}),
                tour.plot_sweep(tour.head_ablation_sweep(m, ids, _last_logit_gap))):
        assert fig.axes
        plt.close(fig)
