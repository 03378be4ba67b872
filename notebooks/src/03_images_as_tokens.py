# %% [markdown]
# # 03 · Images as tokens
#
# **What you will learn**
#
# - what the processor does with `<start_of_image>`: the 256 soft tokens that stand for one
#   picture, and the markers around them;
# - how a picture becomes those 256 vectors (896 px → 64×64 patches → pooled 16×16 → projected
#   to the decoder's width), and which part of the picture each token comes from;
# - pan-and-scan: extra crops of a wide picture, 256 more tokens each;
# - the one exception to causal attention: soft tokens of one image attend to each other in
#   both directions;
# - how to look at text→image attention on the picture itself.
#
# > **About the model in this notebook.** By default it runs on `demo-multimodal`: the *real*
# > Gemma 3 270M decoder with a vision tower and projector drawn from a fixed random seed,
# > **untrained**, and reduced to 4 layers × 288 (real SigLIP: 27 × 1152). Everything about the
# > *mechanics* is real Gemma 3 — the processor, the token layout, the masks, the hooks — but the
# > image tokens carry **no meaning**, so attention on the picture and any text generated about
# > it are not evidence of seeing. Set the environment variable `GEMMA3_4B_DIR` to a Hugging Face
# > folder of Gemma 3 4B and rerun to see the same cells on a trained model.

# %%
import os

import gemma3_lab as gl
from gemma3_lab.analysis import tour
from gemma3_lab.viz import images as viz_images
from gemma3_lab.viz.scene import scene

MODEL = os.environ.get("GEMMA3_4B_DIR") or "demo-multimodal"
model = gl.load(MODEL, progress=False)
UNTRAINED = any("untrained" in note for note in model.config.notes)
print(model.describe())
print("vision tower:", model.config.vision)
if UNTRAINED:
    print("\n>>> UNTRAINED VISION: image tokens carry no meaning in this run <<<")

# %% [markdown]
# ## The picture and the prompt
#
# A synthetic landscape (`gemma3_lab.viz.scene`): a house on the left, the sun on the
# right, wide enough (900 × 400) for pan-and-scan. The prompt marks where the picture goes with
# `<start_of_image>`.

# %%
picture = scene()
prompt = "<start_of_image> Where is the sun in this picture?"
inputs = model.processor(prompt, images=[picture])
span = inputs.image_spans[0]
ids = inputs.input_ids[0].tolist()
piece = model.tokenizer.id_to_token
print("input_ids:", tuple(inputs.input_ids.shape), "· token_types 1 on", int(inputs.token_types.sum()), "slots")
print("pixel_values:", tuple(inputs.pixel_values.shape))
print(span)
print("before the image:", [piece(i) for i in ids[:span.start]])
print(f"slots {span.start}–{span.end - 1}: {span.end - span.start} × {piece(ids[span.start])!r}")
print("after the image: ", [piece(i) for i in ids[span.end:]])

# %% [markdown]
# The processor replaced the single marker by `\n\n<start_of_image>`, then
# `mm_tokens_per_image` placeholder ids (`<image_soft_token>`), then `<end_of_image>\n\n`.
# Whatever the embedding table holds for the placeholders does not matter: the model overwrites
# those slots with the image's features. The token strip shows the layout:

# %%
fig = viz_images.token_strip(inputs, model.tokenizer, model.config)

# %% [markdown]
# ## From pixels to 256 vectors
#
# The picture is resized to 896 × 896 (aspect ratio ignored) and cut into 14-pixel patches. We
# capture the hook points of the vision tower and projector along the way:

# %%
v = model.config.vision
names = ["vision.hook_patch_embed", "vision.hook_post_layernorm", "projector.hook_pooled", "projector.hook_out",
         "hook_image_features", "hook_embed_scaled", "blocks.*.attn.hook_pattern", "blocks.0.attn.hook_mask"]
logits, cache = model.run_with_cache(inputs, names_filter=names, return_logits=False)
side = v.patches_per_side
print(f"{v.image_size} px / patch {v.patch_size} = {side}×{side} = {v.num_patches} patches")
for name in names[:5]:
    print(f"{name:>28}: {tuple(cache[name].shape)}")
feats = cache["hook_image_features"][0]
text_rows = cache["hook_embed_scaled"][0][inputs.token_types[0] == 0]
print(f"mean norm of an image token {feats.norm(dim=-1).mean():.1f}, of a scaled text embedding "
      f"{text_rows.norm(dim=-1).mean():.1f}")

# %% [markdown]
# The tower keeps one vector per patch; the projector average-pools 4×4 patches into one cell of
# a 16 × 16 grid, RMS-normalises it and maps it to the decoder width. Token *t* of the span comes
# from cell `divmod(t, 16)`, row by row — drawn on the original picture:

# %%
fig = viz_images.picture_grid(inputs, config=model.config)

# %% [markdown]
# ## Pan-and-scan: crops for wide pictures
#
# With `pan_and_scan=True` a picture whose sides differ by a ratio of 1.2 or more is also cut
# into 2–4 crops (each at least 256 px) along its long side; each crop is resized to 896 × 896
# on its own and gets its own 256 tokens, after a short text that says what follows:

# %%
pas = model.processor(prompt, images=[picture], pan_and_scan=True)
for s in pas.image_spans:
    print(f"crop {s.crop}: box {s.box} → slots {s.start}–{s.end - 1}")
print(f"{pas.input_ids.shape[1]} tokens in all (without crops: {inputs.input_ids.shape[1]}); "
      f"pixel_values {tuple(pas.pixel_values.shape)}")
soft = model.config.image_token_id
print("the text around the images:", repr(model.tokenizer.decode([i for i in pas.input_ids[0].tolist() if i != soft])))

# %%
fig = viz_images.picture_grid(pas, config=model.config)

# %% [markdown]
# ## The image block attends both ways
#
# In every layer, text is causal. Soft tokens of the *same* image (or crop) may also attend to
# the later soft tokens of that image: the block is bidirectional. The visualizer marks those
# cells above the diagonal (the prompt is too long for every cell, so it shows the first and last
# rows and columns):

# %%
view = gl.AttentionMaskVisualizer(model)(prompt, images=[picture])
print(view.text(width=72))

# %%
fig = view.figure()

# %% [markdown]
# The model really ran with that mask, and really uses it — read from the captured `hook_mask`
# and attention pattern of layer 0:

# %%
mask0 = cache["mask", 0][0, 0]
first, last_soft = span.start, span.end - 1
print(f"first soft token (slot {first}) may attend to the last one (slot {last_soft}):",
      bool(mask0[first, last_soft]))
print(f"text token {piece(ids[span.end + 1])!r} (slot {span.end + 1}) may attend to the next slot:",
      bool(mask0[span.end + 1, span.end + 2]))
ahead = tour.attention_mass(cache["pattern", 0], first, range(first + 1, span.end))
print(f"layer 0: the first soft token puts {ahead.mean():.1%} of its attention (head mean) on later soft tokens")

# %% [markdown]
# ## Text → image attention, on the picture
#
# How much does the last text token (`?`) look at the picture, and where? The share of its
# attention that lands on the 256 soft tokens, per layer:

# %%
q = inputs.input_ids.shape[1] - 1
shares = [tour.attention_mass(cache["pattern", L], q, range(span.start, span.end))
          for L in range(model.config.text.num_layers)]
for L, s in enumerate(shares):
    kind = model.config.text.layer_types[L].short
    print(f"L{L:<2} {kind:6} {'  '.join(f'{x:5.1%}' for x in s)}   (heads 0–{len(s) - 1})")

# %% [markdown]
# `viz.images.image_attention` lays the attention on the picture: each soft token's weight is
# drawn over the cell it was made from (here averaged over the global layers and all heads).

# %%
fig = viz_images.image_attention(cache, inputs, query=q, layers=model.config.text.global_layers)

# %% [markdown]
# With the untrained demo tower this map shows the *mechanism* only — the image tokens are
# random projections of the pixels, so there is nothing for the decoder to look for. With a real
# Gemma 3 4B folder (`GEMMA3_4B_DIR`) the same cell shows where the trained model looks.
#
# Finally, generation runs the same way with images; its text is meaningful only with trained
# vision:

# %%
res = model.generate(prompt, images=[picture], max_new_tokens=12)
label = "UNTRAINED vision, so this says nothing about the picture" if UNTRAINED else "trained vision"
print(f"[{label}]", repr(res.text))

# %% [markdown]
# ## Recap
#
# - `<start_of_image>` in a prompt becomes `\n\n<start_of_image>`, 256 soft-token slots,
#   `<end_of_image>\n\n`; `inputs.image_spans` records where each image's tokens sit.
# - The tower turns 896 × 896 pixels into 64 × 64 patch vectors; the projector pools them to
#   16 × 16 and maps each to the decoder width. Token *t* covers cell `divmod(t, 16)`.
# - Pan-and-scan adds 256 tokens per crop of a wide or tall picture.
# - Inside one image the mask is bidirectional; everywhere else it is causal (and windowed in
#   local layers).
# - `viz.images.image_attention` draws text→image attention on the original picture. On
#   `demo-multimodal` (untrained vision) it shows how the machinery works, not what a model sees.
#
# Next: [04 · activations and the logit lens](04_activations_and_logit_lens.ipynb).
