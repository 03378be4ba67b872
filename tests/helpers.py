"""Helpers shared by test files (tests/ is on sys.path under pytest's default import mode)."""

from __future__ import annotations

import torch

from gemma3_lab.config import Gemma3Config
from gemma3_lab.explorer import Gemma3


def random_gemma(config: Gemma3Config, seed: int = 0, std: float = 0.2) -> Gemma3:
    """A Gemma3 with every parameter drawn from N(0, std²) after `torch.manual_seed(seed)`:
    weights large enough that attention patterns and logits are far from uniform."""
    torch.manual_seed(seed)
    model = Gemma3(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, std)
    return model
