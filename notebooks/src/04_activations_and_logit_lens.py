# %% [markdown]
# # 04 · Activations, the logit lens, ablation and patching
#
# **What you will learn**
#
# - how to capture any activation with `run_with_cache`, choose what to keep, and index the
#   cache TransformerLens-style (`cache["resid_post", 3]`);
# - the logit lens: reading the residual stream after every layer through the final norm and the
#   tied head, to see *when* the answer appears;
# - head ablation: silence one attention head and measure what the prediction loses;
# - activation patching between two prompts that differ in one word, to see *where* the
#   information about that word travels, layer by layer and position by position.
#
# Our running example, on the real Gemma 3 270M: after "The capital of France is Paris. The
# capital of Italy is", the model should say " Rome"; with "Spain" instead of "Italy", " Madrid".

# %%
import torch

import gemma3_lab as gl
from gemma3_lab.analysis import tour
from gemma3_lab.instrument import interventions
from gemma3_lab.viz import lens as viz_lens

model = gl.load(progress=False)
clean = "The capital of France is Paris. The capital of Italy is"
corrupt = "The capital of France is Paris. The capital of Spain is"
for prompt in (clean, corrupt):
    with torch.no_grad():
        probs = model(prompt).logits[0, -1].softmax(-1)
    top = [(model.tokenizer.id_to_token(int(i)), round(float(p), 3)) for p, i in zip(*probs.topk(3))]
    print(f"{prompt!r} → {top}")

# %% [markdown]
# ## `run_with_cache`: every activation by name
#
# The model has a hook point at every interesting site; their names follow the module tree
# (`blocks.3.attn.hook_pattern`). `run_with_cache` runs one forward pass and keeps what matches
# `names_filter` (names, `*` globs or a predicate), optionally only some `layers`, `heads` or
# `positions`.

# %%
names = model.hook_names()
print(len(names), "hook points; those of block 0:")
print([n.removeprefix("blocks.0.") for n in names if n.startswith("blocks.0.")])

# %%
est = model.estimate_cache_bytes(clean)  # from shapes alone: nothing runs
print(f"capturing everything would hold about {est.total / 2**20:.1f} MiB; the largest parts:")
print(est.summary(3))
logits, cache = model.run_with_cache(clean)
print(cache)
print("resid_post of layer 3:", tuple(cache["resid_post", 3].shape), "(B, S, D)")
print("pattern of layer 5 (global):", tuple(cache["pattern", 5].shape), "(B, N, S, T)")
print("top logits kept per position:", tuple(cache.top_logits.ids.shape), "(B, S, k)")

# %%
small_logits, small = model.run_with_cache(clean, names_filter="blocks.*.hook_resid_post", positions=[-1])
print(small, "· kept positions:", small.positions.tolist())
print(tuple(small["resid_post", 17].shape), "— only the last position")

# %% [markdown]
# ## The logit lens
#
# The final hidden state becomes logits through `final_norm` and the tied embedding. The *logit
# lens* applies that same readout to the residual stream after every layer, as if the network
# stopped there. Each cell below is the top next-token guess at that layer and position,
# coloured by its probability.

# %%
lens = cache.logit_lens(k=5)
fig = viz_lens.logit_lens_grid(lens, config=model.config)

# %% [markdown]
# The last column is the one that predicts the answer. Reading it top to bottom:

# %%
last = lens.top_ids.shape[1] - 1
rome = tour.token_id(model, " Rome")
for row, label in enumerate(lens.layer_labels):
    guesses = ", ".join(f"{t!r} {p:.2f}" for t, p in zip(lens.top_tokens[row][last][:3], lens.top_probs[row, last, :3]))
    mark = "  ← Rome is top-1" if int(lens.top_ids[row, last, 0]) == rome else ""
    print(f"{label:>5}: {guesses}{mark}")

# %% [markdown]
# The early layers' guesses are noise from the model's point of view (rare tokens with little
# probability). Look for the layer where the *country* first tops the list, and the one where
# the capital takes over: the patching experiment below finds the same boundary from a different
# angle. The residual-norm figure is the companion view: the size of the stream
# that the lens reads, per position and layer (`<bos>` drawn apart).

# %%
fig = viz_lens.residual_norms(cache, tokens=lens.tokens)

# %% [markdown]
# ## Head ablation
#
# Which attention heads matter for choosing " Rome" over " Madrid"? Our metric is the logit
# difference `logit(Rome) − logit(Madrid)` at the last position. `tour.head_ablation_sweep`
# zeroes one head's output (its slice of `hook_z`, before `o_proj`) at a time, for every head of
# every layer — one batched forward per layer, one head per batch row. Red cells lower the
# preference for Rome, blue cells raise it:

# %%
metric = tour.logit_diff(model, " Rome", " Madrid")
ablation = tour.head_ablation_sweep(model, clean, metric)
fig = tour.plot_sweep(ablation)
N = model.config.text.num_heads
worst = ablation.effect.flatten().argsort()[:3].tolist()
print(f"metric as trained: {ablation.baseline:.2f}")
for i in worst:
    print(f"zeroing layer {i // N} head {i % N}: {ablation.values.flatten()[i]:.2f}")
print(f"lowest metric over all {ablation.values.numel()} single-head ablations: {ablation.values.min():.2f}")

# %% [markdown]
# Each cell is one ordinary intervention. `interventions.ablate_heads(layer, heads)` returns the
# hook for a single run; the strongest cell again, by hand:

# %%
layer, head = worst[0] // N, worst[0] % N
with torch.no_grad():
    one = model.run_with_hooks(clean, fwd_hooks=interventions.ablate_heads(layer, head), logits_to_keep=1)
print(f"layer {layer} head {head} zeroed: metric {metric(one[:, -1]).item():.2f} "
      f"(sweep: {ablation.values[layer, head]:.2f})")

# %% [markdown]
# No single head is essential here — the lowest value above is still a clear preference for
# Rome — but a few heads carry a visible share of it.
#
# ## Activation patching: where does "Italy" travel?
#
# Now we run the *corrupt* prompt ("Spain") but copy in one activation from the *clean* run
# ("Italy"): the residual stream entering layer *L* at position *p*. If that single vector
# carries what the model needs, the prediction moves back towards Rome. `tour.patching_sweep`
# does this for every layer and position and reports the share of the gap closed: 0 = as
# corrupt, 1 = as clean.

# %%
patching = tour.patching_sweep(model, clean, corrupt, metric)
print(f"metric: clean {patching.reference:.2f}, corrupt {patching.baseline:.2f}")
fig = tour.plot_sweep(patching)

# %%
eff = patching.effect
italy = tour.find_tokens(model, model.tokenizer.encode(clean, add_bos=True), " Italy")[0]
last_word = max(L for L in range(eff.shape[0]) if eff[L, italy] > 0.5)
moved = next(L for L in range(eff.shape[0]) if eff[L, -1] > 0.5)
print(f"patching the changed word (position {italy}) restores ≥ 50% up to layer {last_word}; "
      f"patching the last position restores ≥ 50% from layer {moved} on")
others = [p for p in range(eff.shape[1]) if p not in (italy, eff.shape[1] - 1)]
print(f"largest effect at any other position: {eff[:, others].abs().max():.3f}")

# %% [markdown]
# The picture is a clean hand-off. Up to a middle layer the information lives only at the
# position of the changed word; patching anywhere else does nothing. From the next layer on it
# has been copied to the last position, and patching the word's own position no longer helps:
# attention has already read it. The layers around the hand-off are where to look for the heads
# that move it — compare with the ablation map above.
#
# One cell of the map, by hand, with `interventions.patch` (copy the clean run's activations at
# chosen positions into this run):

# %%
_, clean_cache = model.run_with_cache(clean, names_filter="blocks.*.hook_resid_pre")
last = len(model.tokenizer.encode(clean, add_bos=True)) - 1
hooks = interventions.patch(clean_cache, f"blocks.{moved}.hook_resid_pre", positions=[last])
with torch.no_grad():
    one = model.run_with_hooks(corrupt, fwd_hooks=hooks, logits_to_keep=1)
print(f"corrupt run, layer {moved} input at position {last} from the clean run: metric {metric(one[:, -1]).item():.2f} "
      f"(sweep: {patching.values[moved, last]:.2f})")

# ## Recap
#
# - `model.run_with_cache(prompt, names_filter=..., layers=..., positions=...)` returns the logits
#   and an `ActivationCache`; `cache["resid_post", 3]` and friends index it; the estimate tells the
#   cost before running.
# - `cache.logit_lens()` reads every layer through the final norm and tied head;
#   `viz.lens.logit_lens_grid` draws it.
# - `interventions.ablate_heads` / `interventions.patch` are hooks for one intervention;
#   `tour.head_ablation_sweep` and `tour.patching_sweep` run them over every head or every
#   (layer, position) in batches.
# - On this prompt the country's identity sits at its own position until a middle layer, then
#   moves to the final position, where the answer is read out.
#
# Next: [05 · generation side by side](05_generation_side_by_side.ipynb).
