"""`gl.load("demo-multimodal")`: the real Gemma 3 270M decoder with a seeded, UNTRAINED and
reduced SigLIP tower and projector, so the whole image path runs without a 4B download."""

from __future__ import annotations

import math

import torch
from torch import nn

from .config import VisionConfig

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


def load_demo_multimodal(dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu", progress: bool = True):
    """The bundled 270M plus a vision tower and projector drawn from a fixed seed.

    Nothing about the vision side is trained: use it to explore the image path (processor,
    soft-token placement, bidirectional image masks, hooks), not to describe pictures.
    The tower keeps SigLIP's 896 px / patch 14 / 256-token geometry but is reduced to
    4 layers × 288 (4 heads of 72). Measured in float32 on the 2-core development CPU while
    other jobs shared it (load average 5–9): one 896×896 image through tower and projector
    in 5–7.5 s; the full 27 × 1152 shape took 8.75 s per layer there, ≈ 4 min per image.
    Soft-token id 262144 lies outside the 270M's 262144-row vocabulary; the model's
    out-of-vocabulary guard looks up <pad> there before the image features overwrite it.
    """
    from .load import build, load

    base = load(None, dtype=dtype, device=device, progress=progress)
    config = base.config.replace(vision=DEMO_VISION, name=DEMO_NAME, notes=(*base.config.notes, NOTE))
    # the projection is scaled so soft tokens are as large as the scaled text embeddings
    emb = base.embed.weight.detach()
    target_rms = float(torch.linalg.vector_norm(emb.float()) / math.sqrt(emb.numel())) * config.text.embed_scale
    state = dict(base.state_dict())
    state.update(seeded_vision_state(config, target_rms, dtype, base.device))
    tokenizer = base.tokenizer
    _add_soft_token(tokenizer, config.image_token_id)
    model = build(config, state, tokenizer)
    model.source = f"{base.source} + seeded untrained vision (seed {SEED})"
    return model


def seeded_vision_state(config, target_rms: float, dtype: torch.dtype, device) -> dict[str, torch.Tensor]:
    """SigLIP-style initial weights from a private generator (the global RNG is untouched).

    lecun-normal patches, N(0, 1/C) positions, xavier-normal linears with zero biases,
    unit LayerNorms; the projector's RMSNorm starts at w = 0 (scale 1) and its matrix at
    N(0, target_rms² / C), so a unit-RMS pooled token maps to about `target_rms`.
    """
    from .model.vision import Projector, VisionTower

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


def _add_soft_token(tokenizer, image_token_id: int) -> None:
    """Give the 270M tokenizer `<image_soft_token>` at 262144, as the 4B+ tokenizers have, so
    prompts decode and display as they would there (the embedding has no row for it)."""
    from tokenizers import AddedToken

    if tokenizer is None or tokenizer.image_token_id is not None or tokenizer.vocab_size != image_token_id:
        return
    tokenizer.backend.add_special_tokens([AddedToken("<image_soft_token>", normalized=False, special=True)])
