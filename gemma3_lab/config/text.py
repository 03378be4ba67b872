"""The text decoder's configuration: sizes, the local/global layer pattern as data
(`TextConfig.layer_types`), the two RoPE tables, and reading/writing `gemma3_text` dicts
(legacy keys included)."""

from __future__ import annotations

import dataclasses
import enum
import math
from dataclasses import dataclass, field
from typing import Any, Mapping

from gemma3_lab.config.checks import LIMITS, check_sizes, float_field, int_field
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
        check_sizes(self, "text config")
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
        n = int_field(d, "num_hidden_layers", 26)
        if not 1 <= n <= LIMITS["num_layers"]:  # before a per-layer list is built
            raise Gemma3LabError(f"config field num_hidden_layers = {n} must be in 1..{LIMITS['num_layers']}")
        lt = d.get("layer_types")
        if lt is not None and not isinstance(lt, (list, tuple)):
            raise Gemma3LabError(f"config field layer_types must be a list, got {type(lt).__name__}")
        pattern = int_field(d, "sliding_window_pattern", 6)
        if lt is None and pattern < 1:
            raise Gemma3LabError(f"config field sliding_window_pattern = {pattern} must be >= 1")
        layer_types = tuple(lt) if lt else pattern_layer_types(n, pattern)
        rope_local, rope_global = _rope_from_hf(d)
        eos = d.get("eos_token_id", 1)
        eos_ids = tuple(number("config field eos_token_id", e, integer=True)
                        for e in (eos if isinstance(eos, (list, tuple)) else [eos]))
        return cls(
            vocab_size=int_field(d, "vocab_size", 262_208),
            hidden_size=int_field(d, "hidden_size", 2304),
            intermediate_size=int_field(d, "intermediate_size", 9216),
            num_layers=n,
            num_heads=int_field(d, "num_attention_heads", 8),
            num_kv_heads=int_field(d, "num_key_value_heads", 4),
            head_dim=int_field(d, "head_dim", 256),
            query_pre_attn_scalar=float_field(d, "query_pre_attn_scalar", 256),
            sliding_window=int_field(d, "sliding_window", None) if d.get("sliding_window") else 4096,
            layer_types=layer_types,
            rope_local=rope_local,
            rope_global=rope_global,
            max_position_embeddings=int_field(d, "max_position_embeddings", 131_072),
            rms_norm_eps=float_field(d, "rms_norm_eps", 1e-6),
            final_logit_softcapping=(None if d.get("final_logit_softcapping") is None
                                     else float_field(d, "final_logit_softcapping", None)),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", True)),
            pad_token_id=int_field(d, "pad_token_id", 0) if d.get("pad_token_id") is not None else 0,
            bos_token_id=int_field(d, "bos_token_id", 2),
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
            float_field(p, "rope_theta", theta), kind, float_field(p, "factor", 1.0) if kind == "linear" else 1.0
        )

    params = d.get("rope_parameters")
    if params and AttentionType.GLOBAL.value in mapping(params, "config field rope_parameters"):
        return (
            one(params.get(AttentionType.LOCAL_SLIDING.value), 10_000.0),
            one(params.get(AttentionType.GLOBAL.value), 1_000_000.0),
        )
    local = RopeConfig(float_field(d, "rope_local_base_freq", 10_000.0))
    g_theta = float_field(d, "rope_theta", 1_000_000.0)
    scaling = d.get("rope_scaling")
    scaling = {**mapping(scaling, "config field rope_scaling"), "rope_theta": g_theta} if scaling else None
    return local, one(scaling, g_theta)

