# %% [markdown]
# # 05 · Generation side by side
#
# **What you will learn**
#
# - what `model.generate` records at every step: the token, its probability, and the top
#   candidates the model considered;
# - how two decoding settings — greedy and sampling with temperature and top-p — produce
#   different text from the same prompt, and where exactly they part;
# - how to generate under an intervention (a steering vector added to the residual stream) and
#   compare it step by step with the plain run;
# - how to tell what the intervention itself changed, by replaying one run's tokens with and
#   without it.
#
# All runs use the real Gemma 3 270M (base model) on CPU; 20 new tokens each.

# %%
import gemma3_lab as gl
from gemma3_lab.analysis import tour
from gemma3_lab.instrument import interventions

model = gl.load(progress=False)
prompt = "Once upon a time, in a small village by the sea,"
N_NEW = 20

# %% [markdown]
# ## Two decoding settings
#
# Greedy decoding takes the most likely token every time. Sampling draws from the distribution
# after a temperature (0.8 sharpens it) and top-p (keep the smallest set of tokens holding 90 %
# of the probability); a `seed` makes the draw repeatable.

# %%
greedy = model.generate(prompt, max_new_tokens=N_NEW)
sampled = model.generate(prompt, max_new_tokens=N_NEW, do_sample=True, temperature=0.8, top_p=0.9, seed=0)
again = model.generate(prompt, max_new_tokens=N_NEW, do_sample=True, temperature=0.8, top_p=0.9, seed=0)
print("greedy :", repr(greedy.text))
print("sampled:", repr(sampled.text))
print("same seed, same tokens:", again.token_ids == sampled.token_ids)

# %% [markdown]
# Every step is recorded: the chosen token, its log-probability, and the top candidates under
# the model's own distribution (temperature 1, no filtering — so two runs' numbers are
# comparable). The first steps of the greedy run:

# %%
print(tour.top_k_table(greedy, k=4, steps=8))

# %% [markdown]
# ## One intervention: a steering vector
#
# "Activation addition": take the residual stream after layer 6 for the word " dragon", subtract
# the one for " the", and add a fraction of the difference at every position while generating.
# `interventions.steer` returns the hooks; `with model.hooks(...)` keeps them attached for the
# whole generation (prefill and every decode step) and removes them afterwards.

# %%
LAYER, SCALE = 6, 0.2
vector = tour.steering_vector(model, LAYER, " dragon", " the")
steer = interventions.steer(f"blocks.{LAYER}.hook_resid_post", vector, SCALE)
with model.hooks(steer):
    steered = model.generate(prompt, max_new_tokens=N_NEW)
print(f"steering vector: norm {vector.norm():.0f}, added × {SCALE} after layer {LAYER}")
print("steered:", repr(steered.text))

# %% [markdown]
# ## Step by step
#
# Three runs, one row per step: the text each step added and the probability of that token under
# the model that chose it. `≠` marks a run once it has left the greedy run's tokens.

# %%
runs = {"greedy": greedy, "sampled T=0.8 p=0.9": sampled, f"steered (L{LAYER} ×{SCALE})": steered}
print(tour.step_table(runs))

# %%
fig = tour.plot_steps(runs)

# %% [markdown]
# `GenerationResult.first_divergence` gives the first step where two runs chose differently;
# at that step, both runs' candidate lists show *why*:

# %%
for name, other in (("sampled", sampled), ("steered", steered)):
    print(f"greedy vs {name}: first divergence at step {greedy.first_divergence(other)}")
print()
print(tour.divergence_report(greedy, sampled, ("greedy", "sampled")))
print()
print(tour.divergence_report(greedy, steered, ("greedy", "steered")))

# %% [markdown]
# The sampled run left the greedy path by *drawing* a less likely candidate: both runs see the
# same distribution at that step. The steered run left it because the intervention *changed* the
# distribution.
#
# ## What the intervention changed
#
# After the first divergence the two runs condition on different text, so comparing them
# further mixes the intervention's effect with the effect of different prefixes. To isolate the
# intervention, `tour.forced_effect` replays the greedy run's tokens in one forward pass, with
# and without the steering hooks, and compares the next-token distributions at every step:

# %%
effect = tour.forced_effect(model, greedy, steer)
print(effect.table())

# %%
flips = [i for i in range(len(effect.tokens)) if effect.top_hooked[i] != effect.top_plain[i]]
print(f"mean KL(plain ‖ steered) per step: {effect.kl.mean():.3f} nats; largest at step {int(effect.kl.argmax())} "
      f"({effect.kl.max():.3f})")
print("steps where steering changes the top-1 token:", [(i, effect.top_plain[i], effect.top_hooked[i]) for i in flips])

# %% [markdown]
# The steering vector shifts the distribution at every step, but only at a few does it overturn
# the top choice — the first of those is where the steered generation left the greedy one.
#
# A consistency check: replaying the *steered* run's own tokens with the hooks gives back the
# probabilities it recorded while generating (with its KV cache, one token at a time):

# %%
replay = tour.forced_effect(model, steered, steer)
recorded = [s.prob for s in steered.steps]
gap = max(abs(a - b) for a, b in zip(recorded, replay.p_hooked.tolist()))
print(f"max |recorded − replayed| probability: {gap:.1e}")

# %% [markdown]
# ## Recap
#
# - `model.generate` returns a `GenerationResult` whose `steps` hold every token, its
#   probability and the top-k candidates; `seed` makes sampling repeatable.
# - `first_divergence` finds where two runs part; `tour.step_table`, `tour.top_k_table` and
#   `tour.divergence_report` lay runs side by side.
# - Any hook list from `interventions` (steer, ablate, patch) works around `generate` with
#   `with model.hooks(...)`.
# - To see what an intervention itself changed, replay one run's tokens with and without it
#   (`tour.forced_effect`): same prefix, so every difference is the intervention's.
