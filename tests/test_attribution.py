"""Every attribution carries its own check: direct logit attribution sums to the logit, heads
to hook_attn_out and neurons to hook_mlp_out (with the sandwich norms' scales frozen), integrated
gradients to f(x) − f(baseline), and attribution patching equals gradient × difference taken by
hand — on a tiny random model (fast) and on the real 270M at ≥ 600 tokens."""

from __future__ import annotations

import pytest
import torch

from gemma3_lab.analysis import attribution, attribution_patching
from gemma3_lab.analysis.tour import head_patching_sweep, patching_sweep
from gemma3_lab.instrument.decompose import MissingActivation

IDS = torch.tensor([[2, 5, 9, 3, 7, 11, 4, 8, 13, 6]])


def rel_err(a, b) -> float:
    return float((a - b).abs().max() / b.abs().max())


def _check_sums(model, ids, tol):
    logits, cache = model.run_with_cache(ids, full_logits=True, top_k=0)
    last = logits[0, -1]
    top = int(last.argmax())
    stack, labels = cache.decompose_resid(return_labels=True)
    L = model.config.text.num_layers
    assert labels[:3] == ["embed", "0_attn_out", "0_mlp_out"] and len(labels) == 1 + 2 * L
    dla = cache.logit_attrs(stack, tokens=top)  # (C, B, S)
    assert rel_err(dla.sum(0)[0], logits[0, :, top].float()) <= tol
    heads, hl = cache.stack_head_results(return_labels=True, incl_remainder=True, pos_slice=-1)
    assert hl[0] == "L0H0" and hl[-1] == "remainder"
    assert rel_err(cache.logit_attrs(heads, top, pos_slice=-1).sum(0)[0, 0], last[top].float()) <= tol
    N = model.config.text.num_heads
    for i in range(L):
        attn_out = cache["attn_out", i].float()
        assert rel_err(cache["result", i].sum(2), attn_out) <= tol
        assert rel_err(heads[i * N:(i + 1) * N].sum(0), attn_out[:, -1:]) <= tol
    return cache, top


def test_dla_sums_to_the_logit_tiny(tiny_gqa):
    cache, top = _check_sums(tiny_gqa, IDS, 1e-5)
    # neurons through the frozen post-ffw norm sum to hook_mlp_out
    neurons, nl = cache.stack_neuron_results(layer=1, pos_slice=[2, 9], return_labels=True)
    assert nl[0] == "L0N0" and len(nl) == tiny_gqa.cfg.d_mlp
    assert rel_err(neurons.sum(0), cache["mlp_out", 0][:, [2, 9]]) <= 1e-5
    acc, al = cache.accumulated_resid(incl_mid=True, return_labels=True)
    assert al[-1] == "final_post" and al[:2] == ["0_pre", "0_mid"]
    torch.testing.assert_close(acc[-1], cache["resid_post", -1])
    torch.testing.assert_close(cache.decompose_resid().sum(0), acc[-1], atol=1e-5, rtol=0)
    # the final norm with its frozen scale turns the summed stack into the normed residual
    torch.testing.assert_close(cache.apply_ln_to_stack(acc[-1:])[0], cache["final_norm.hook_normalized"])


def test_unfrozen_norms_do_not_sum(tiny_gqa):
    """Why the scales must be frozen: each head normed on its own is not its share of attn_out."""
    _, cache = tiny_gqa.run_with_cache(IDS, top_k=0)
    norm = tiny_gqa.blocks[0].post_attention_norm
    raw = cache["result", 0] / (cache["blocks.0.post_attention_norm.hook_scale"][..., None, :] * (1 + norm.weight))
    with torch.no_grad():
        unfrozen = norm(raw).sum(2)  # each head re-normalised by its own rms
    assert rel_err(unfrozen, cache["attn_out", 0]) > 0.1


def test_remove_batch_dim_and_token_slices(tiny_gqa):
    _, cache = tiny_gqa.run_with_cache(IDS, top_k=0)
    flat = cache.remove_batch_dim()
    assert flat["resid_pre", 1].shape == cache["resid_pre", 1].shape[1:]
    stack = flat.decompose_resid(pos_slice=[3, 4])
    toks = torch.tensor([7, 11])
    per_pos = flat.logit_attrs(stack, toks, incorrect_tokens=torch.tensor([1, 2]), pos_slice=[3, 4])  # (C, 2)
    batched = cache.logit_attrs(cache.decompose_resid(pos_slice=[3, 4]), toks[None], torch.tensor([[1, 2]]),
                                pos_slice=[3, 4])
    torch.testing.assert_close(per_pos, batched[:, 0])
    with pytest.raises(ValueError, match="batch of one"):
        tiny_gqa.run_with_cache(IDS.expand(2, -1), top_k=0)[1].remove_batch_dim()


def test_missing_hooks_are_named(tiny_gqa):
    _, cache = tiny_gqa.run_with_cache(IDS, names_filter="blocks.*.hook_attn_out", top_k=0)
    with pytest.raises(MissingActivation, match="hook_mlp_out"):
        cache.decompose_resid(incl_embeds=False)
    with pytest.raises(MissingActivation, match="attn.hook_z"):
        cache.stack_head_results()


def test_integrated_gradients_complete_tiny(tiny_gqa):
    # the tiny model's <pad> row is zero (nn.Embedding's padding_idx): a baseline of token 1
    # everywhere but <bos> instead, passed as a tensor
    scale = torch.tensor(tiny_gqa.cfg.d_model**0.5)
    base = (tiny_gqa.W_E[1] * scale).detach().expand(IDS.shape[1], -1).clone()
    base[0] = tiny_gqa.W_E[2].detach() * scale
    r = attribution.integrated_gradients(tiny_gqa, IDS, position=6, baseline=base)
    assert r.values.shape == (IDS.shape[1],) and r.token == int(IDS[0, 7])
    assert r.completeness_error <= 0.01
    assert abs(r.target - r.baseline_target) > 0.1  # a real gap, so the check can fail
    assert r.values[0] == 0 and (r.values[7:] == 0).all()  # <bos> kept, later tokens unseen
    gxi = attribution.gradient_x_input(tiny_gqa, IDS, position=6)
    e = tiny_gqa.W_E[IDS[0, :7]] * torch.tensor(tiny_gqa.cfg.d_model**0.5)
    emb = e.clone().requires_grad_()
    with torch.enable_grad(), tiny_gqa.hooks([("hook_inputs_embeds", lambda t, hook: emb[None])]):
        y = tiny_gqa(IDS[:, :7], return_type="logits")[0, 6, gxi.token]
        (g,) = torch.autograd.grad(y, emb)
    torch.testing.assert_close(gxi.values[:7], (g * e).sum(-1).double(), atol=1e-5, rtol=1e-5)


def test_quadrature_integrates_polynomials():
    x, w = attribution.quadrature(32)
    assert len(x) == 32 and abs(w.sum() - 1) < 1e-12
    assert abs((w * x**7).sum() - 1 / 8) < 1e-12


def test_attribution_patching_is_gradient_times_difference(tiny_gqa):
    clean, corrupt = IDS, IDS.clone()
    corrupt[0, 3] = 40
    metric = lambda logits: (logits[:, 3] - logits[:, 4]).double()  # noqa: E731
    est = attribution_patching.attribution_patching(tiny_gqa, clean, corrupt, metric)
    exact = patching_sweep(tiny_gqa, clean, corrupt, metric)
    assert est["hook_resid_pre"].values.shape == exact.values.shape
    assert est["hook_resid_pre"].reference == pytest.approx(exact.reference, abs=1e-5)
    assert est["hook_resid_pre"].baseline == pytest.approx(exact.baseline, abs=1e-5)
    assert est["attn.hook_z"].values.shape == head_patching_sweep(tiny_gqa, clean, corrupt, metric).values.shape
    _, cc = tiny_gqa.run_with_cache(clean, top_k=0)
    _, xc = tiny_gqa.run_with_cache(corrupt, top_k=0)
    for site, layer, pos in [("hook_resid_pre", 1, 3), ("hook_mlp_out", 0, 5), ("hook_attn_out", 2, 9)]:
        name = f"blocks.{layer}.{site}"
        delta = torch.zeros_like(xc[name], requires_grad=True)
        with torch.enable_grad(), tiny_gqa.hooks([(name, lambda t, hook: t + delta)]):
            (g,) = torch.autograd.grad(metric(tiny_gqa(corrupt, return_type="logits")[:, -1])[0], delta)
        by_hand = ((cc[name] - xc[name])[0, pos] * g[0, pos]).sum().double()
        assert est[site].values[layer, pos] - est[site].baseline == pytest.approx(float(by_hand), abs=1e-5)
    name = "blocks.1.attn.hook_z"
    delta = torch.zeros_like(xc[name], requires_grad=True)
    with torch.enable_grad(), tiny_gqa.hooks([(name, lambda t, hook: t + delta)]):
        (g,) = torch.autograd.grad(metric(tiny_gqa(corrupt, return_type="logits")[:, -1])[0], delta)
    by_hand = ((cc[name] - xc[name]) * g)[0, :, 2].sum().double()
    assert est["attn.hook_z"].values[1, 2] - est["attn.hook_z"].baseline == pytest.approx(float(by_hand), abs=1e-5)


# ------------------------------------------------------------------------------ the real 270M
@pytest.mark.real
def test_dla_sums_to_the_logit_real_long(real_model, long_prompt):
    ids = real_model.to_inputs(long_prompt).input_ids[:, :640]
    assert ids.shape[1] >= 600
    _check_sums(real_model, ids, 1e-4)


@pytest.mark.real
def test_integrated_gradients_complete_real(real_model):
    r = attribution.integrated_gradients(real_model, "The Eiffel Tower is in the city of")
    assert real_model.to_string([r.token]) == " Paris"
    assert r.completeness_error <= 0.01


def test_who_wrote_numbers_and_figures(tiny_gqa):
    from gemma3_lab.analysis.who_wrote import who_wrote
    from gemma3_lab.viz.attribution import input_attribution_figure, who_wrote_figure

    w = who_wrote(tiny_gqa, IDS, position=5, input_attribution=False)
    with torch.no_grad():
        logit = tiny_gqa(IDS, return_type="logits")[0, 5, int(IDS[0, 6])]
    assert w.token == int(IDS[0, 6]) and w.logit == pytest.approx(float(logit), abs=1e-5)
    assert w.dla_error <= 1e-5 * abs(w.logit) + 1e-6
    torch.testing.assert_close(w.heads.sum(1), w.attn, atol=1e-5, rtol=0)
    fig = who_wrote_figure(w, top_heads=5)
    bars = [len(ax.patches) for ax in fig.axes]
    assert bars == [1 + 2 * tiny_gqa.cfg.n_layers, 5]
    fig2 = input_attribution_figure(w.tokens, torch.linspace(-1, 1, len(w.tokens)), "t")
    assert [t.get_text() for t in fig2.texts[1:]] == w.tokens
