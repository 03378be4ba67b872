"""Interventions through hooks on the real 270M: head ablation (zero, mean), activation
patching from another run's cache, steering vectors; hooks leave no trace once removed."""

from __future__ import annotations

import pytest
import torch

from gemma3_lab.instrument.interventions import ablate_heads, patch, steer

pytestmark = pytest.mark.real

CLEAN = "The Eiffel Tower is located in the city of"
CORRUPT = "The Colosseum is located in the city of"


@pytest.fixture(scope="module")
def base(real_model):
    with torch.no_grad():
        return real_model(CLEAN).logits


def test_ablating_a_head_changes_logits_and_removal_restores_them_exactly(real_model, base):
    ablated = real_model.run_with_hooks(CLEAN, fwd_hooks=ablate_heads(3, 1))
    assert (ablated - base).abs().max() > 1e-3
    assert not any(hp.active for hp in real_model.hook_points.values())
    with torch.no_grad():
        again = real_model(CLEAN).logits
    assert torch.equal(again, base)  # bit for bit


def test_zero_ablation_really_zeroes_the_head(real_model):
    with real_model.hooks(ablate_heads(5, [0, 2])):
        _, cache = real_model.run_with_cache(CLEAN, "blocks.5.attn.hook_z", top_k=0)
    z = cache["z", 5]  # captured after the ablation (hooks run in the order attached)
    assert (z[:, :, [0, 2]] == 0).all() and (z[:, :, 1].abs() > 0).any()


def test_mean_ablation_uses_the_reference_means(real_model):
    _, ref = real_model.run_with_cache(CORRUPT, "blocks.2.attn.hook_z", top_k=0)
    means = ref["z", 2].mean(dim=(0, 1))  # (N, H)
    with real_model.hooks(ablate_heads(2, 3, mode="mean", means=ref)):
        _, cache = real_model.run_with_cache(CLEAN, "blocks.2.attn.hook_z", top_k=0)
    z = cache["z", 2]
    assert torch.equal(z[0, :, 3], means[3].expand_as(z[0, :, 3]))
    with pytest.raises(ValueError, match="needs means"):
        ablate_heads(2, 3, mode="mean")


def test_patching_the_whole_residual_reproduces_the_source_run(real_model):
    a, b = real_model.to_inputs(CLEAN).input_ids, real_model.to_inputs(CORRUPT).input_ids
    assert a.shape == b.shape  # same length: positions line up
    logits_a, cache_a = real_model.run_with_cache(a, ["blocks.4.hook_resid_pre", "blocks.4.attn.hook_z"], top_k=0)
    patched = real_model.run_with_hooks(b, fwd_hooks=patch(cache_a, "blocks.4.hook_resid_pre"))
    assert (patched - logits_a).abs().max() <= 1e-4
    # one position and one head only: a small, local change
    one = real_model.run_with_hooks(b, fwd_hooks=patch(cache_a, "blocks.4.attn.hook_z", positions=[3], heads=[1]))
    with torch.no_grad():
        plain_b = real_model(b).logits
    assert (one[:, :3] - plain_b[:, :3]).abs().max() == 0  # causal: earlier positions untouched
    assert (one[:, 3:] - plain_b[:, 3:]).abs().max() > 0


def test_steering_adds_the_vector_where_asked(real_model):
    D = real_model.config.text.hidden_size
    v = torch.randn(D, generator=torch.Generator().manual_seed(0))
    with real_model.hooks(steer("blocks.6.hook_resid_post", v, scale=4.0, positions=[2])):
        _, cache = real_model.run_with_cache(CLEAN, ["blocks.6.hook_resid_post"], top_k=0)
    _, plain = real_model.run_with_cache(CLEAN, ["blocks.6.hook_resid_post"], top_k=0)
    diff = cache["resid_post", 6] - plain["resid_post", 6]
    ulp = float(plain["resid_post", 6].abs().max()) * 2**-23  # Gemma's residual is large: rounding of r + v
    assert torch.allclose(diff[0, 2], 4.0 * v, atol=4 * ulp)
    assert diff[0, :2].abs().max() == 0 and diff[0, 3:].abs().max() == 0


def test_interventions_work_while_generating(real_model):
    """Steering at one absolute slot during generation hits that token, not each step's row 0."""
    prompt = "My favourite food is"
    n = len(real_model.to_inputs(prompt).input_ids[0])
    D = real_model.config.text.hidden_size
    v = torch.randn(D, generator=torch.Generator().manual_seed(1))
    with real_model.hooks(steer("blocks.6.hook_resid_post", v, scale=8.0, positions=[n + 1])):
        res = real_model.generate(prompt, max_new_tokens=4, stop_ids=(), capture="blocks.6.hook_resid_post")
    # recorded step by step as the steered run's are (fast steps would be recorded after them, in one forward)
    plain = real_model.generate(prompt, max_new_tokens=4, stop_ids=(), capture="blocks.6.hook_resid_post",
                                fast=False)
    a, b = res.captures["blocks.6.hook_resid_post"], plain.captures["blocks.6.hook_resid_post"]
    assert res.token_ids[:2] == plain.token_ids[:2]  # positions before the steered slot: same path
    assert torch.equal(a[n], b[n]) and not torch.equal(a[n + 1], b[n + 1])
