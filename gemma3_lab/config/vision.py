"""The SigLIP vision tower's configuration."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

from gemma3_lab.config.checks import check_sizes, float_field, int_field
from gemma3_lab.errors import Gemma3LabError, number

@dataclass(frozen=True)
class VisionConfig:
    """SigLIP-So400m as used by Gemma 3 4B/12B/27B (docs/gemma3.md §1.2)."""

    hidden_size: int = 1152
    intermediate_size: int = 4304
    num_layers: int = 27
    num_heads: int = 16
    num_channels: int = 3
    image_size: int = 896
    patch_size: int = 14
    layer_norm_eps: float = 1e-6

    def __post_init__(self) -> None:
        check_sizes(self, "vision config")
        if self.hidden_size % self.num_heads or self.patch_size > self.image_size:
            raise Gemma3LabError(f"vision config: hidden_size {self.hidden_size} must be a multiple of num_heads "
                                 f"{self.num_heads} and patch_size {self.patch_size} at most image_size "
                                 f"{self.image_size}")
        number("vision config layer_norm_eps", self.layer_norm_eps, above=0)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def patches_per_side(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.patches_per_side**2

    @classmethod
    def from_hf(cls, d: Mapping[str, Any]) -> "VisionConfig":
        return cls(
            hidden_size=int_field(d, "hidden_size", 768),
            intermediate_size=int_field(d, "intermediate_size", 3072),
            num_layers=int_field(d, "num_hidden_layers", 12),
            num_heads=int_field(d, "num_attention_heads", 12),
            num_channels=int_field(d, "num_channels", 3),
            image_size=int_field(d, "image_size", 224),
            patch_size=int_field(d, "patch_size", 16),
            layer_norm_eps=float_field(d, "layer_norm_eps", 1e-6),
        )

    def to_hf(self) -> dict:
        return {
            "model_type": "siglip_vision_model",
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_channels": self.num_channels,
            "image_size": self.image_size,
            "patch_size": self.patch_size,
            "layer_norm_eps": self.layer_norm_eps,
            "hidden_act": "gelu_pytorch_tanh",
            "attention_dropout": 0.0,
            "vision_use_head": False,
        }

