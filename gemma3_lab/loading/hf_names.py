"""The one rename table between Hugging Face Gemma 3 checkpoint names and gemma3_lab's names,
and the parameter shapes a config implies (docs/gemma3.md §6)."""

from __future__ import annotations

import re
from typing import Iterable

from gemma3_lab.config import Gemma3Config

# Where each part of the model sits in every layout we read, most specific first.
#   text-only (Gemma3ForCausalLM / ForSequenceClassification): model.*
#   Gemma3TextModel:                                            no prefix
#   multimodal, original Hub and transformers' default save:    language_model.model.*, vision_tower[.vision_model].*
#   multimodal, transformers 5.x in memory / GH converter:      model.language_model.*, model.vision_tower[.vision_model].*
#   Gemma3Model in memory:                                      language_model.*, vision_tower.*
SOURCE_PREFIXES: dict[str, tuple[str, ...]] = {
    "text": ("model.language_model.", "language_model.model.", "language_model.", "model.", ""),
    "vision": (
        "model.vision_tower.vision_model.", "vision_tower.vision_model.", "model.vision_tower.", "vision_tower.",
    ),
    "projector": ("model.multi_modal_projector.", "multi_modal_projector."),
    "head": ("language_model.", ""),
}

# What `save_hf_folder` writes: transformers 5.x's in-memory ("current") names, which it loads unchanged.
SAVE_PREFIXES_TEXT = {"text": "model.", "head": ""}
SAVE_PREFIXES_MULTIMODAL = {
    "text": "model.language_model.", "vision": "model.vision_tower.",
    "projector": "model.multi_modal_projector.", "head": "",
}

# (part, checkpoint name after the part's prefix, internal name or None = dropped on purpose).
# {n} is a layer index, {wb} is weight|bias.
RENAMES: tuple[tuple[str, str, str | None], ...] = (
    ("text", "embed_tokens.weight", "embed.weight"),
    ("text", "layers.{n}.input_layernorm.weight", "blocks.{n}.pre_attention_norm.weight"),
    ("text", "layers.{n}.self_attn.q_proj.weight", "blocks.{n}.attn.q_proj.weight"),
    ("text", "layers.{n}.self_attn.k_proj.weight", "blocks.{n}.attn.k_proj.weight"),
    ("text", "layers.{n}.self_attn.v_proj.weight", "blocks.{n}.attn.v_proj.weight"),
    ("text", "layers.{n}.self_attn.o_proj.weight", "blocks.{n}.attn.o_proj.weight"),
    ("text", "layers.{n}.self_attn.q_norm.weight", "blocks.{n}.attn.q_norm.weight"),
    ("text", "layers.{n}.self_attn.k_norm.weight", "blocks.{n}.attn.k_norm.weight"),
    ("text", "layers.{n}.post_attention_layernorm.weight", "blocks.{n}.post_attention_norm.weight"),
    ("text", "layers.{n}.pre_feedforward_layernorm.weight", "blocks.{n}.pre_ffw_norm.weight"),
    ("text", "layers.{n}.mlp.gate_proj.weight", "blocks.{n}.mlp.gate_proj.weight"),
    ("text", "layers.{n}.mlp.up_proj.weight", "blocks.{n}.mlp.up_proj.weight"),
    ("text", "layers.{n}.mlp.down_proj.weight", "blocks.{n}.mlp.down_proj.weight"),
    ("text", "layers.{n}.post_feedforward_layernorm.weight", "blocks.{n}.post_ffw_norm.weight"),
    ("text", "norm.weight", "final_norm.weight"),
    ("head", "lm_head.weight", "lm_head.weight"),
    ("head", "score.weight", "score.weight"),
    ("vision", "embeddings.patch_embedding.{wb}", "vision.patch_embedding.{wb}"),
    ("vision", "embeddings.position_embedding.weight", "vision.position_embedding.weight"),
    ("vision", "encoder.layers.{n}.layer_norm1.{wb}", "vision.blocks.{n}.layer_norm1.{wb}"),
    ("vision", "encoder.layers.{n}.self_attn.q_proj.{wb}", "vision.blocks.{n}.attn.q_proj.{wb}"),
    ("vision", "encoder.layers.{n}.self_attn.k_proj.{wb}", "vision.blocks.{n}.attn.k_proj.{wb}"),
    ("vision", "encoder.layers.{n}.self_attn.v_proj.{wb}", "vision.blocks.{n}.attn.v_proj.{wb}"),
    ("vision", "encoder.layers.{n}.self_attn.out_proj.{wb}", "vision.blocks.{n}.attn.out_proj.{wb}"),
    ("vision", "encoder.layers.{n}.layer_norm2.{wb}", "vision.blocks.{n}.layer_norm2.{wb}"),
    ("vision", "encoder.layers.{n}.mlp.fc1.{wb}", "vision.blocks.{n}.mlp.fc1.{wb}"),
    ("vision", "encoder.layers.{n}.mlp.fc2.{wb}", "vision.blocks.{n}.mlp.fc2.{wb}"),
    ("vision", "post_layernorm.{wb}", "vision.post_layernorm.{wb}"),
    # SigLIP's attention-pooling head: present when a config leaves vision_use_head at its
    # default True, but Gemma 3 overwrites pooler_output and never runs it (docs/gemma3.md §4.3).
    ("vision", "head.{rest}", None),
    ("projector", "mm_soft_emb_norm.weight", "projector.mm_soft_emb_norm.weight"),
    ("projector", "mm_input_projection_weight", "projector.mm_input_projection_weight"),
)

_PLACEHOLDERS = {"{n}": r"(?P<n>\d+)", "{wb}": r"(?P<wb>weight|bias)", "{rest}": r"(?P<rest>.+)"}


def _pattern(template: str, prefixes: Iterable[str] = ("",)) -> re.Pattern:
    body = re.escape(template)
    for ph, rx in _PLACEHOLDERS.items():
        body = body.replace(re.escape(ph), rx)
    return re.compile("(?:" + "|".join(re.escape(p) for p in prefixes) + ")" + body)


_TO_INTERNAL = [(_pattern(src, SOURCE_PREFIXES[part]), dst) for part, src, dst in RENAMES]
_TO_HF = [(_pattern(dst), part, src) for part, src, dst in RENAMES if dst is not None]


class Unmatched(str):
    """Marker for a checkpoint name no rule knows (distinct from a name dropped on purpose)."""


def to_internal(name: str) -> str | None | Unmatched:
    """The internal name for a checkpoint tensor; None if deliberately dropped; `Unmatched` if unknown."""
    for rx, dst in _TO_INTERNAL:
        m = rx.fullmatch(name)
        if m:
            return None if dst is None else dst.format(**m.groupdict())
    return Unmatched(name)


def to_hf(name: str, multimodal: bool) -> str:
    """The transformers 5.x name (the layout `save_hf_folder` writes) for an internal name."""
    prefixes = SAVE_PREFIXES_MULTIMODAL if multimodal else SAVE_PREFIXES_TEXT
    for rx, part, src in _TO_HF:
        m = rx.fullmatch(name)
        if m and part in prefixes:
            return prefixes[part] + src.format(**m.groupdict())
    raise KeyError(f"no Hugging Face name for {name!r} in a {'multimodal' if multimodal else 'text-only'} model")


def expected_shapes(config: Gemma3Config, num_labels: int | None = None) -> dict[str, tuple[int, ...]]:
    """Every parameter a config implies, in model order, with its shape (docs/gemma3.md §6 "Shapes", §4).

    `lm_head.weight` only when the head is untied; `score.weight` only when `num_labels` is given
    (Gemma3ForSequenceClassification).
    """
    t = config.text
    d, v, i_ff, hd = t.hidden_size, t.vocab_size, t.intermediate_size, t.head_dim
    q, kv = t.num_heads * hd, t.num_kv_heads * hd
    shapes: dict[str, tuple[int, ...]] = {"embed.weight": (v, d)}
    for i in range(t.num_layers):
        b = f"blocks.{i}."
        shapes.update({
            b + "pre_attention_norm.weight": (d,),
            b + "attn.q_proj.weight": (q, d),
            b + "attn.k_proj.weight": (kv, d),
            b + "attn.v_proj.weight": (kv, d),
            b + "attn.o_proj.weight": (d, q),
            b + "attn.q_norm.weight": (hd,),
            b + "attn.k_norm.weight": (hd,),
            b + "post_attention_norm.weight": (d,),
            b + "pre_ffw_norm.weight": (d,),
            b + "mlp.gate_proj.weight": (i_ff, d),
            b + "mlp.up_proj.weight": (i_ff, d),
            b + "mlp.down_proj.weight": (d, i_ff),
            b + "post_ffw_norm.weight": (d,),
        })
    shapes["final_norm.weight"] = (d,)
    if not t.tie_word_embeddings:
        shapes["lm_head.weight"] = (v, d)
    if num_labels is not None:
        shapes["score.weight"] = (num_labels, d)
    vc = config.vision
    if vc is not None:
        dv, iv = vc.hidden_size, vc.intermediate_size
        shapes["vision.patch_embedding.weight"] = (dv, vc.num_channels, vc.patch_size, vc.patch_size)
        shapes["vision.patch_embedding.bias"] = (dv,)
        shapes["vision.position_embedding.weight"] = (vc.num_patches, dv)
        for j in range(vc.num_layers):
            b = f"vision.blocks.{j}."
            for norm in ("layer_norm1", "layer_norm2"):
                shapes[b + norm + ".weight"] = shapes[b + norm + ".bias"] = (dv,)
            for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
                shapes[b + f"attn.{proj}.weight"], shapes[b + f"attn.{proj}.bias"] = (dv, dv), (dv,)
            shapes[b + "mlp.fc1.weight"], shapes[b + "mlp.fc1.bias"] = (iv, dv), (iv,)
            shapes[b + "mlp.fc2.weight"], shapes[b + "mlp.fc2.bias"] = (dv, iv), (dv,)
        shapes["vision.post_layernorm.weight"] = shapes["vision.post_layernorm.bias"] = (dv,)
        shapes["projector.mm_soft_emb_norm.weight"] = (dv,)
        shapes["projector.mm_input_projection_weight"] = (dv, d)
    return shapes
