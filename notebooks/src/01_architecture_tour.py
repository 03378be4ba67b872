# %% [markdown]
# # 01 · Architecture tour: one token's journey through Gemma 3 270M
#
# **What you will learn**
#
# - how big each part of Gemma 3 270M is, and why most of its parameters are the embedding;
# - why the embedding row is multiplied by √D before it enters the first layer;
# - the *four* RMSNorms around every layer, and why their weights are stored as an offset `w`
#   and applied as `(1 + w)`;
# - what q/k norm does to queries and keys;
# - the two RoPE tables (θ = 10,000 for local layers, θ = 1,000,000 for global ones);
# - grouped-query attention with a single key/value head;
# - the tied output head, checked by hand;
# - how the size of the residual stream grows layer by layer.
#
# Everything below is computed from the real Gemma 3 270M weights bundled with `gemma3_lab`;
# the cells only call the library (`gemma3_lab.analysis.tour` holds the small helpers).

# %%
import inspect

import gemma3_lab as gl
from gemma3_lab.analysis import tour
from gemma3_lab.model.block import Block
from gemma3_lab.model.norm import RMSNorm

model = gl.load(progress=False)  # the bundled real Gemma 3 270M, float32, CPU
print(model.describe())

# %% [markdown]
# ## The shape of the model
#
# The configuration is a frozen dataclass; the layer pattern is data (`layer_types`), not a
# formula scattered through the code.

# %%
t = model.config.text
print(f"width D = {t.hidden_size}, MLP width = {t.intermediate_size}, vocabulary = {t.vocab_size:,}")
print(f"{t.num_layers} layers; {t.num_heads} query heads and {t.num_kv_heads} key/value head(s) of {t.head_dim} dims")
print(f"sliding window = {t.sliding_window} tokens, context = {t.max_position_embeddings:,} tokens")
print("layer types:", " ".join(k.short[0].upper() for k in t.layer_types), "(L = local sliding, G = global)")
print("global layers:", t.global_layers)

# %%
parts = tour.parameter_breakdown(model)
total = model.num_parameters()
for name, n in parts.items():
    print(f"{name:>24}: {n / 1e6:7.1f} M  ({100 * n / total:4.1f} %)")
print(f"{'total':>24}: {total / 1e6:7.1f} M")

# %% [markdown]
# A 262,144-token vocabulary at width 640 is a big table: the embedding is most of the model.
# Because the output head reuses that same table (see the end of this notebook), it is counted
# once.
#
# ## One block, drawn by its own docstring
#
# Each of the 18 layers is the same "sandwich": a norm **before** and a norm **after** both the
# attention and the MLP, with the residual added after the post-norm.

# %%
print(Block.__doc__)

# %% [markdown]
# ## Step 1 · the embedding row, scaled by √D
#
# We follow the last token of a short prompt. `tour.token_journey` runs the model once with
# `run_with_cache` and reads the hook points along the way (`hook_embed`, `hook_embed_scaled`,
# the residual stream of every block, q/k before and after their norms, the final norm).

# %%
prompt = "The capital of France is"
j = tour.token_journey(model, prompt)
print("tokens:", j.tokens, "· following", repr(j.token), "at position", j.position)
print(f"embedding row norm          {j.embed_norm:8.3f}")
print(f"× scale √{t.hidden_size} = {t.embed_scale:.4f} (as the model rounds it: {j.embed_scale:.4f})")
print(f"= what enters block 0       {j.scaled_norm:8.3f}")

# %% [markdown]
# The embedding rows are small (norm about 1, so each of the 640 entries is about 1/√D): the
# same table is the output head, where small rows suit the logits. On the way in, multiplying by
# √D makes each entry about 1 and the row's norm about √D. The scale is rounded to the weight
# dtype before the multiply, which only matters in bfloat16.
#
# ## Step 2 · four norms per layer, each `x / rms(x) · (1 + w)`
#
# This is the norm's whole forward pass, read from the library:

# %%
print(inspect.getsource(RMSNorm.forward))

# %% [markdown]
# The stored weight `w` starts at zero, so a fresh norm is the identity scale `1 + 0`. After
# training the gains are far from 1, and very different for the four positions in the sandwich:

# %%
g = tour.norm_gains(model)
for name in tour.NORMS + tour.QK_NORMS:
    print(f"{name:>20}: mean (1+w) from {g.mean[name].min():7.2f} to {g.mean[name].max():7.2f} across layers;"
          f" single channels from {g.min[name].min():7.2f} to {g.max[name].max():8.2f}")
print(f"{'final_norm':>20}: mean {g.final[0]:.2f}, channels from {g.final[1]:.2f} to {g.final[2]:.2f}")
fig = tour.plot_norm_gains(g)

# %% [markdown]
# Negative gains exist too (`1 + w < 0` flips a channel). The post-norms decide how loudly each
# layer writes into the residual stream; we will see the consequence in step 6.
#
# ## Step 3 · q/k norm and grouped-query attention with one key/value head
#
# Each head's query and key vector get their own RMSNorm (`q_norm`, `k_norm`, over the 256
# head dims) *before* RoPE. The values are not normed. And there is only **one** key/value head,
# shared by all four query heads:

# %%
attn = model.blocks[0].attn
for name, p in attn.named_parameters():
    print(f"{name:>16}: {tuple(p.shape)}")
_, cache = model.run_with_cache(prompt, names_filter=["blocks.0.attn.hook_q", "blocks.0.attn.hook_k",
                                                        "blocks.0.attn.hook_v"])
for kind in ("q", "k", "v"):
    print(f"hook_{kind} (B, S, heads, H):", tuple(cache[kind, 0].shape))
per_token = tour.kv_bytes_per_token(model.config)
print(f"KV cache: {per_token / 1024:.0f} KiB per token in float32 across all layers; "
      f"{t.num_heads}× that if every query head had its own key/value head")

# %% [markdown]
# Why norm q and k? The scores are `q·k / √256`. Without a norm their size would follow the size
# of the projections; with it, each head's query length is set by the learned `(1 + w)` of
# `q_norm` and the query's direction, not by how large the projection came out. Below (right
# panel) the raw per-head query norms of our token vary a lot from layer to layer; after `q_norm`
# they sit in a narrower band. (Left panel: step 6.)

# %%
fig = tour.plot_journey(j)
spread = lambda x: float(x.max() / x.min())  # noqa: E731
print(f"query norms over all layers and heads: raw {j.q_raw.min():.1f}–{j.q_raw.max():.1f} "
      f"(×{spread(j.q_raw):.0f}), after q_norm {j.q_normed.min():.1f}–{j.q_normed.max():.1f} "
      f"(×{spread(j.q_normed):.0f})")

# %% [markdown]
# ## Step 4 · two RoPE tables
#
# Local (sliding-window) layers rotate queries and keys with base θ = 10,000; global layers with
# θ = 1,000,000. Each of the 128 dimension pairs of a head rotates at its own frequency
# ωᵢ = θ^(−2i/256) per token, so it turns a full circle every `2π/ωᵢ` tokens:

# %%
fig = tour.plot_rope(model)
for kind, w in tour.rope_wavelengths(model).items():
    rope = t.rope_for(gl.AttentionType.LOCAL_SLIDING if kind == "local" else gl.AttentionType.GLOBAL)
    print(f"{kind:>6} (θ = {rope.theta:>9,.0f}): longest wavelength {float(w.max()):>12,.0f} tokens")
turns = tour.full_turns_within(model, t.sliding_window)
print(f"pairs that turn fully within the {t.sliding_window}-token window: "
      f"local {turns['local']} of {t.head_dim // 2}, global {turns['global']} of {t.head_dim // 2}")

# %% [markdown]
# The Gemma 3 report raised the base of the global layers to 1M for long contexts and kept 10k
# for the local ones, which never look further back than their window: with the slow table,
# far fewer pairs wrap around within a few hundred tokens, so distant positions stay
# distinguishable. (The 4B and larger models also stretch the global table by a linear factor
# of 8, which `plot_rope` shows in its legend for those models.)
#
# ## Step 5 · the tied head
#
# There is no separate output matrix: the logits are the final-normed residual times the
# *unscaled* embedding table, transposed. `token_journey` recomputed that product by hand and
# compared it with the model's logits:

# %%
print("separate lm_head?", model.lm_head is not None)
print(f"max |logits − final_norm(h) · Eᵀ| = {j.tied_head_error:.2e}")
print("next-token prediction after", repr(prompt), "→", [(tok, round(p, 3)) for tok, p in j.top])

# %% [markdown]
# ## Step 6 · the residual stream grows layer by layer
#
# The left panel of the figure in step 3 shows the norm of the residual stream after each
# block, and what attention and the MLP add to it (after their post-norms). Numbers:

# %%
print(f"entering block 0: {j.scaled_norm:.1f}")
print(f"after the last block: {j.resid_post[-1]:.0f}  (×{j.resid_post[-1] / j.scaled_norm:.0f})")
print(f"after the final norm: {j.final:.1f}")
print("largest write by attention in layer", int(j.attn_out.argmax()), "and by the MLP in layer",
      int(j.mlp_out.argmax()))
bos = tour.token_journey(model, prompt, position=0)
print(f"the <bos> token's residual peaks at {bos.resid_post.max():.0f} (layer {int(bos.resid_post.argmax())}), "
      f"{bos.resid_post.max() / j.resid_post.max():.1f}× our token's peak")
_, cache = model.run_with_cache(prompt, names_filter="blocks.*.attn.hook_pattern")
last = len(j.tokens) - 1
on_bos = [tour.attention_mass(cache["pattern", i], last, 0) for i in range(t.num_layers)]
print(f"attention from {j.token!r} to <bos>, averaged over all heads and layers: "
      f"{sum(float(a.mean()) for a in on_bos) / t.num_layers:.0%}")

# %% [markdown]
# Pre-norms make each sublayer read a normalised input however large the stream has grown,
# and the large post-norm gains let later layers write big updates: the stream grows by orders of
# magnitude, and the final norm brings it back to a fixed scale before the head. The first
# token, `<bos>`, grows much larger than the others, and the last line shows how much of the
# attention lands on it: it is an "attention sink" that heads look at when nothing else in the
# prompt is relevant to them.
#
# ## Recap
#
# - The embedding (262k × 640) is most of the 270M parameters, and it doubles as the output head.
# - The embedding row is multiplied by √D (√640 ≈ 25.3) on the way in, not on the way out.
# - Every layer wraps attention and the MLP in a pre-norm and a post-norm; every RMSNorm applies
#   `(1 + w)` computed in float32.
# - q and k are RMS-normed per head before RoPE; values are not.
# - Local layers use RoPE θ = 10k, global layers θ = 1M; 5 local layers for every global one.
# - Four query heads share one key/value head, which keeps the KV cache small.
# - The residual stream grows by orders of magnitude through the stack; `<bos>` most of all.
#
# Next: [02 · attention masks](02_attention_masks.ipynb) looks at *which* tokens each layer may
# attend to.
