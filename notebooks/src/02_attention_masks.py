# %% [markdown]
# # 02 · Attention masks: causal, sliding and global
#
# **What you will learn**
#
# - the three rules behind every Gemma 3 text mask (causal, sliding window, global), written as
#   small pure functions that both the model and the pictures call;
# - how to draw the masks of any prompt with `gl.AttentionMaskVisualizer`, in the terminal and as
#   a matplotlib figure, and the atlas of all 18 layers;
# - why local and global layers are *identical* on short prompts, and what changes once a prompt
#   is longer than the 512-token window;
# - how much attention the global layers really send beyond the window, and what the model
#   loses when they cannot.

# %%
from pathlib import Path

import torch

import gemma3_lab as gl
from gemma3_lab.analysis import tour
from gemma3_lab.model.masks import causal, layer_mask, sliding_window

model = gl.load(progress=False)
t = model.config.text
print(model.describe())
print(f"sliding window: {t.sliding_window} tokens; global layers: {t.global_layers}")

# %% [markdown]
# ## The rules, as pure functions
#
# A mask answers "may query position *q* attend to key position *k*?" (True = yes). The three
# text rules, for 8 positions and a toy window of 3:

# %%
pos = torch.arange(8)
show = lambda m: print("\n".join(" ".join("■" if v else "·" for v in row) for row in m.reshape(8, 8)))  # noqa: E731
print("causal: k <= q")
show(causal(pos, pos))
print("\nsliding window 3: k > q - 3 (on its own, no causality)")
show(sliding_window(pos, pos, 3))
print("\na local layer: causal AND window (itself + 2 before)")
show(layer_mask(pos, pos, window=3))
print("\na global layer: causal only")
show(layer_mask(pos, pos, window=None))

# %% [markdown]
# The model builds every layer's mask with `layer_mask` (adding padding and image rules, see
# notebook 03); the visualizers call the same function, so a picture shows exactly what runs.
#
# ## The mask visualizer
#
# `gl.AttentionMaskVisualizer` needs only the config and tokenizer. On a short prompt the real
# 512-token window cuts nothing, so for teaching we pass `window=4`. Calling it returns a view
# that prints itself in a terminal and renders as HTML in a notebook; `.text()` is the terminal
# picture, and `.figure()` the same in matplotlib:

# %%
viz = gl.AttentionMaskVisualizer(model, window=4)
view = viz("The quick brown fox jumps over the lazy dog")
print(view.text(width=110))

# %%
fig = view.figure()

# %% [markdown]
# The window edge (cyan) sits before the first key a local query can still see; the pink cells
# are what causality would allow but the window removes. One panel covers all 15 local layers and one
# all 3 global layers, because layers of a type share one mask.
#
# With the model's real window the two panels are the same picture: any prompt up to 512 tokens
# fits in the window, so local layers see exactly what global layers see.

# %%
for n in (12, t.sliding_window, t.sliding_window + 1, 700):
    local, glob = gl.model_masks([t.sliding_window, None], n)
    seen = local[0, 0, -1].sum().item(), glob[0, 0, -1].sum().item()
    print(f"{n:4d} tokens: local == global? {torch.equal(local, glob)!s:5}  "
          f"last query sees {seen[0]} keys in a local layer, {seen[1]} in a global one")

# %% [markdown]
# ## The atlas: every layer at once
#
# On a long prompt the atlas shows the band of the local layers next to the full triangle of
# the global layers 5, 11 and 17. Our long prompt is a sentence naming a ship, several
# paragraphs of unrelated text (`data/long_text.txt`), and a question about the ship:

# %%
text = Path("data/long_text.txt").read_text()
prompt = ("The ship in this story is called the Heliotrope.\n\n" + text +
          "\nQuestion: what is the ship in this story called?\nAnswer: The ship is called the")
ids = model.tokenizer.encode(prompt, add_bos=True)
fact = tour.find_tokens(model, ids, " Heliotrope")
print(f"{len(ids)} tokens; 'Heliotrope' is tokens {fact} = {[model.tokenizer.id_to_token(ids[i]) for i in fact]}, "
      f"{len(ids) - 1 - fact[0]} positions before the last one")

# %%
fig = gl.AttentionMaskVisualizer(model).atlas(prompt)

# %% [markdown]
# ## How much attention do the global layers send beyond the window?
#
# No local layer can look from the question back to the ship's name. (Information could still
# hop forward through a chain of local layers, up to 511 tokens per hop; the global layers are
# the direct route.) We capture the global layers' attention patterns (`run_with_cache` computes
# the explicit softmax only for hooked layers) and, for every query that has keys 512 or more
# positions back, add up the attention on those keys. `<bos>` is where idle heads park their
# attention, so we also report the share without it.

# %%
globals_ = list(t.global_layers)
logits, cache = model.run_with_cache(prompt, names_filter="blocks.*.attn.hook_pattern", layers=globals_,
                                     return_logits=False)
last = len(ids) - 1
print("next token:", [(model.tokenizer.id_to_token(int(i)), round(float(p), 3))
                      for p, i in zip(*logits[0, -1].softmax(-1).topk(3))])
print(f"\n{'layer':>5} {'head':>4}  beyond window  (without <bos>)  last query → 'Heliotrope'")
for L in globals_:
    beyond = tour.mass_beyond_window(cache["pattern", L], t.sliding_window)
    no_bos = tour.mass_beyond_window(cache["pattern", L], t.sliding_window, first_key=1)
    on_fact = tour.attention_mass(cache["pattern", L], last, fact)
    for h in range(t.num_heads):
        print(f"{L:5d} {h:4d}  {beyond[h]:13.1%}  {no_bos[h]:15.1%}  {on_fact[h]:26.1%}")

# %% [markdown]
# Read the table row by row: the first two columns say how much of a typical late query's
# attention goes further back than a local layer could reach; the last column shows the heads
# that look straight at the ship's name from the final position.
#
# ## What if the global layers were local too?
#
# `tour.window_hooks` returns hooks that narrow the masks of chosen layers to the sliding window
# (the model attends with whatever `hook_mask` hands on). We run the same prompt with all three
# global layers narrowed to 512:

# %%
with torch.no_grad(), model.hooks(tour.window_hooks(model, globals_)):
    narrowed = model(prompt, logits_to_keep=1).logits
for name, lg in (("as trained", logits), ("globals narrowed to 512", narrowed)):
    p = lg[0, -1].float().softmax(-1)
    top = [(model.tokenizer.id_to_token(int(i)), round(float(v), 3)) for v, i in zip(*p.topk(3))]
    print(f"{name:>24}: p('▁Heli') = {p[ids[fact[0]]]:.3f}   top-3 {top}")

# %% [markdown]
# With a 512-token view everywhere the name is out of direct reach, and the model does not
# recover it through the relay of local layers either: it has to guess. This is the trade Gemma 3
# makes: five of every six layers keep a KV cache of at most 512
# tokens, and the sixth keeps the whole context.
#
# ## Recap
#
# - A Gemma 3 text mask is `causal`, and in local layers also `k > q − window`; these are pure
#   functions of positions, shared by the model and the visualizers.
# - `gl.AttentionMaskVisualizer(model)(prompt)` prints (terminal) or displays (notebook) the masks;
#   `.figure()` and `.atlas()` draw them with matplotlib.
# - Up to 512 tokens local and global layers have identical masks; beyond that, local layers see
#   only the last 512 keys.
# - Global layers put a real share of their attention beyond the window, and narrowing them to
#   the window makes the model lose a fact stated more than 512 tokens earlier.
#
# Next: [03 · images as tokens](03_images_as_tokens.ipynb) adds the one exception to causality:
# image tokens.
