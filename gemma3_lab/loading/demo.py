"""The pieces of `gl.load("demo-multimodal")`: a seeded, UNTRAINED and reduced SigLIP tower and
projector for the real Gemma 3 270M decoder, so the whole image path runs without a 4B download
(`gemma3_lab.load.load_demo_multimodal` puts them together)."""

from __future__ import annotations

import math

import torch
from torch import nn

from gemma3_lab.config import Gemma3Config, VisionConfig
from gemma3_lab.model.vision import Projector, VisionTower

DEMO_NAME = "demo-multimodal"
SEED = 0
# SigLIP's geometry (896 px, patch 14 -> 64×64 patches -> 16×16 = 256 soft tokens) and head
# size (72), but 4 layers × 288 wide instead of 27 × 1152: the full tower takes minutes per
# image on a 2-core CPU, this one seconds (see `load_demo_multimodal`).
DEMO_VISION = VisionConfig(hidden_size=288, intermediate_size=1152, num_layers=4, num_heads=4)
NOTE = (
    "untrained vision: seeded random SigLIP-shaped tower reduced to 4 layers × 288 (real: 27 × 1152) "
    "and projector; image tokens carry no meaning"
)


def demo_config(base: Gemma3Config) -> Gemma3Config:
    """The 270M's config with the demo tower added and the model labelled untrained."""
    return base.replace(vision=DEMO_VISION, name=DEMO_NAME, notes=(*base.notes, NOTE))


def seeded_vision_state(config, target_rms: float, dtype: torch.dtype, device) -> dict[str, torch.Tensor]:
    """SigLIP-style initial weights from a private generator (the global RNG is untouched).

    lecun-normal patches, N(0, 1/C) positions, xavier-normal linears with zero biases,
    unit LayerNorms; the projector's RMSNorm starts at w = 0 (scale 1) and its matrix at
    N(0, target_rms² / C), so a unit-RMS pooled token maps to about `target_rms`.
    """
    g = torch.Generator().manual_seed(SEED)
    with torch.device("meta"):
        parts = nn.ModuleDict({"vision": VisionTower(config.vision), "projector": Projector(config)})
    C = config.vision.hidden_size
    out = {}
    for name, p in parts.named_parameters():
        shape = p.shape
        if name.endswith(".bias") or name == "projector.mm_soft_emb_norm.weight":
            t = torch.zeros(shape)
        elif "layer_norm" in name or "post_layernorm" in name:
            t = torch.ones(shape)
        elif name == "vision.patch_embedding.weight":
            t = torch.randn(shape, generator=g) / math.sqrt(shape[1] * shape[2] * shape[3])
        elif name == "vision.position_embedding.weight":
            t = torch.randn(shape, generator=g) / math.sqrt(C)
        elif name == "projector.mm_input_projection_weight":
            t = torch.randn(shape, generator=g) * (target_rms / math.sqrt(C))
        else:  # attention and MLP matrices
            t = torch.randn(shape, generator=g) * math.sqrt(2.0 / (shape[0] + shape[1]))
        out[name] = t.to(dtype=dtype, device=device)
    return out


def add_soft_token(tokenizer, image_token_id: int) -> None:
    """Give the 270M tokenizer `<image_soft_token>` at 262144, as the 4B+ tokenizers have, so
    prompts decode and display as they would there (the embedding has no row for it)."""
    from tokenizers import AddedToken

    if tokenizer is None or tokenizer.image_token_id is not None or tokenizer.vocab_size != image_token_id:
        return
    tokenizer.backend.add_special_tokens([AddedToken("<image_soft_token>", normalized=False, special=True)])
