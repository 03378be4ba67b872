# %% [markdown]
# # 06 · Which heads wrote this token?
#
# **What you will learn**
#
# - direct logit attribution (DLA): the final logit of a token split exactly into what the
#   embedding, every attention layer, every MLP and every head wrote into the residual stream;
# - why that split needs care on Gemma: the *sandwich norms* (`post_attention_norm`,
#   `post_ffw_norm`) make each sublayer's output non-linear in its parts, until their scales are
#   frozen at their values in the run — shown with numbers;
# - input attribution: integrated gradients against gradient × input, with the completeness check;
# - attribution patching, one backward pass that estimates every activation patch, against the
#   real patching sweep of notebook 04.
#
# The API is TransformerLens': `run_with_cache`, `decompose_resid`, `stack_head_results`,
# `logit_attrs`, `apply_ln_to_stack`, `W_O`, `cfg`. Running example, on the real Gemma 3 270M:
# "The Eiffel Tower is in the city of" → " Paris".

# %%
import torch

import gemma3_lab as gl
from gemma3_lab.analysis import attribution, attribution_patching, tour
from gemma3_lab.analysis.who_wrote import who_wrote
from gemma3_lab.viz import attribution as viz_attr

model = gl.load(progress=False)
prompt = "The Eiffel Tower is in the city of"
logits, cache = model.run_with_cache(prompt, top_k=0)
paris = int(logits[0, -1].argmax())
print(model.to_str_tokens(prompt))
print(f"top prediction {model.to_string([paris])!r}, logit {logits[0, -1, paris]:.3f}; "
      f"{model.cfg.n_layers} layers × {model.cfg.n_heads} heads, d_model {model.cfg.d_model}")

# %% [markdown]
# ## The residual stream, taken apart
#
# The residual entering the final norm is the sum of its parts: the scaled embedding (Gemma
# multiplies by √d_model), then each layer's attention output and MLP output. There is no
# positional embedding to add: RoPE acts inside attention. `decompose_resid` stacks them, and
# `logit_attrs` sends each through the final norm — with *its* scale frozen at its value in the
# run — and the tied unembedding column of " Paris":

# %%
stack, labels = cache.decompose_resid(pos_slice=-1, return_labels=True)
dla = cache.logit_attrs(stack, paris, pos_slice=-1)[:, 0, 0]  # (components,)
print(f"{len(labels)} components: {labels[:4]} ... {labels[-2:]}")
print(f"sum of the DLAs {dla.sum():.4f} vs the logit {logits[0, -1, paris]:.4f} "
      f"(relative error {abs(dla.sum() - logits[0, -1, paris]) / logits[0, -1, paris].abs():.1e})")
for i in dla.abs().argsort(descending=True)[:5].tolist():
    print(f"  {labels[i]:>11}: {dla[i]:+.2f}")

# %% [markdown]
# The same numbers, by layer and by head, as the app's inspector shows them
# (`analysis.who_wrote` computes them, `viz.attribution` draws them):

# %%
w = who_wrote(model, prompt, input_attribution=False)
fig = viz_attr.who_wrote_figure(w)
N = model.cfg.n_heads
best = int(w.heads.flatten().argmax())
print(f"the largest single head: L{best // N}H{best % N} with {w.heads.flatten()[best]:+.2f} of {w.logit:.2f}")

# %% [markdown]
# ## The sandwich-norm point, in numbers
#
# A head's output `z_h W_O[h]` is not what it adds to the residual: the *sum* over heads goes
# through `post_attention_norm`, `o · s · (1 + w)` with `s = 1/rms(o)` per position. Normalise
# each head on its own and the pieces no longer add up; freeze `s` at its value in the run and
# they add up exactly. For the layer of the largest head, at the last position:

# %%
layer = best // N
z = cache["z", layer][0, -1]  # (N, H)
raw = torch.einsum("nh,nhd->nd", z, model.W_O[layer].detach())  # each head's share of attn.hook_out
norm = model.blocks[layer].post_attention_norm
attn_out = cache["attn_out", layer][0, -1]
with torch.no_grad():
    unfrozen = norm(raw).sum(0)  # every head normalised by its own rms
frozen = cache["result", layer][0, -1].sum(0)  # scale frozen: cache["result", l] is per head
print(f"layer {layer}: |attn_out| = {attn_out.norm():.2f}")
print(f"  heads normed separately, summed: off by {(unfrozen - attn_out).norm():.2f}")
print(f"  heads with the frozen scale, summed: off by {(frozen - attn_out).norm():.2e}")
head_dla = cache.logit_attrs(cache.stack_head_results(layer + 1, pos_slice=-1)[-N:], paris, pos_slice=-1)[:, 0, 0]
print(f"layer {layer}'s heads' DLA to ' Paris': {[round(v, 2) for v in head_dla.tolist()]}")
u = model.W_U[:, paris].detach()
frozen_sum = float(cache.logit_attrs(stack, paris, pos_slice=-1).sum())
own = float((cache.apply_ln_to_stack(stack, pos_slice=-1, recompute_ln=True)[:, 0, 0] @ u).sum())
print(f"final norm, frozen scale (1/rms = {float(cache['final_norm.hook_scale'][0, -1]):.5f}): components sum to "
      f"{frozen_sum:.2f}, the logit; each component normed by its own rms (recompute_ln): {own:.2f}")

# %% [markdown]
# Frozen scales make DLA exact but *direct* only: a head that shrinks the rms of its layer's
# output changes every other head's share too, and that indirect effect is not in the bars.
#
# ## Which input tokens mattered? Integrated gradients vs gradient × input
#
# Both work on the scaled embeddings (what enters block 0). Gradient × input is one backward
# pass, a first-order guess. Integrated gradients averages the gradient along the path from a
# baseline — here every token but `<bos>` replaced by the scaled `<pad>` embedding — to the
# prompt, and its attributions must sum to f(prompt) − f(baseline): the completeness check.

# %%
ig = attribution.integrated_gradients(model, prompt)
gxi = attribution.gradient_x_input(model, prompt)
print(f"f(prompt) = {ig.target:.3f}, f(baseline) = {ig.baseline_target:.3f}; IG sums to {ig.values.sum():.3f} "
      f"with {ig.steps} steps: completeness error {ig.completeness_error:.2%}")
print(f"gradient × input sums to {gxi.values.sum():.3f} (no such check: it is not a path integral)")
for t, a, b in zip(model.to_str_tokens(prompt), ig.values, gxi.values):
    print(f"  {t!r:>10}  IG {a:+7.2f}   grad×input {b:+6.2f}")

# %%
fig = viz_attr.input_attribution_figure(w.tokens, ig.values, "Integrated gradients for ' Paris'", width=60)

# %%
fig = viz_attr.input_attribution_figure(w.tokens, gxi.values, "Gradient × input for ' Paris'", width=60)
tops = [w.tokens[int(a.values.argmax())] for a in (ig, gxi)]
print(f"largest attribution: IG {tops[0]!r}, gradient × input {tops[1]!r}")

# %% [markdown]
# The two disagree on the ranking, not just the scale (the top token of each is printed below):
# gradient × input is a local slope at the prompt, while integrated gradients says how much of
# the climb from the baseline's logit to the prompt's each token accounts for. Completeness holds only with a sensible baseline: an all-zero one sits in
# the RMSNorm's ε region, where f jumps within α < 10⁻³ and no quadrature follows it —
# try `baseline="zero"` and read `completeness_error`.
#
# ## Attribution patching against real patching
#
# Notebook 04 patched the residual stream of "…capital of Spain is" with the clean run's
# ("…Italy is") at every (layer, position): one forward per cell, batched. Attribution patching
# estimates every cell at once with one backward pass of the corrupt run:
# (a_clean − a_corrupt) · ∂metric/∂a.

# %%
clean = "The capital of France is Paris. The capital of Italy is"
corrupt = "The capital of France is Paris. The capital of Spain is"
metric = tour.logit_diff(model, " Rome", " Madrid")
atp = attribution_patching.attribution_patching(model, clean, corrupt, metric)
exact = tour.patching_sweep(model, clean, corrupt, metric)
r = attribution_patching.agreement(atp["hook_resid_pre"], exact)
print(f"sites estimated: {sorted(atp)}")
print(f"resid_pre, {exact.values.numel()} cells: correlation of the effects {r:.3f}")
fig = tour.plot_sweep(exact)

# %%
fig = tour.plot_sweep(atp["hook_resid_pre"])
word = next(i for i, c in enumerate(exact.cols) if "→" in c)
handoff = int(exact.effect[:, -1].gt(0.5).int().argmax())  # first layer where the last position carries it
before = slice(0, handoff)
print(f"at the changed word ({exact.cols[word]}), layers 0–{handoff - 1}: exact effect "
      f"{exact.effect[before, word].min():.2f}–{exact.effect[before, word].max():.2f}, "
      f"estimate {atp['hook_resid_pre'].effect[before, word].min():.2f}–{atp['hook_resid_pre'].effect[before, word].max():.2f}")
print(f"at the last position, layers {handoff}–17: exact {exact.effect[handoff:, -1].min():.2f}–"
      f"{exact.effect[handoff:, -1].max():.2f}, estimate {atp['hook_resid_pre'].effect[handoff:, -1].min():.2f}–"
      f"{atp['hook_resid_pre'].effect[handoff:, -1].max():.2f}")

# %%
heads_exact = tour.head_patching_sweep(model, clean, corrupt, metric)
rh = attribution_patching.agreement(atp["attn.hook_z"], heads_exact)
err = (atp["attn.hook_z"].effect - heads_exact.effect).abs()
print(f"per head ({heads_exact.values.numel()} heads): correlation {rh:.3f}, "
      f"largest gap {err.max():.3f} of the share closed")
fig = tour.plot_sweep(atp["attn.hook_z"])

# %% [markdown]
# The estimate finds the same two places — the changed word until the hand-off, the last
# position after it — and nothing elsewhere. It is linear in the difference, so it is least
# accurate where one patch moves the run a long way: at the changed word before the hand-off the
# exact patch restores the clean run fully, and the first-order estimate (printed above) gives
# only part of that. Use it to find candidates in one backward pass, then confirm them with the
# exact sweep.
