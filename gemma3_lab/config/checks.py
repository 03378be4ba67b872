"""The bounds every config is checked against, and the readers of one config-dict field:
each refusal is one line naming the field."""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

from gemma3_lab.errors import number

# Sanity bounds, far above every published Gemma 3 (27B: 62 layers, width 5376, vocab 262,208):
# a config outside them is a typo or an attack, refused before a single tensor is allocated.
LIMITS = {
    "vocab_size": 2**20, "hidden_size": 65_536, "intermediate_size": 2**20, "num_layers": 1000,
    "num_heads": 1024, "num_kv_heads": 1024, "head_dim": 4096, "sliding_window": 2**24,
    "max_position_embeddings": 2**24, "num_channels": 4, "image_size": 8192, "patch_size": 1024,
}


def check_sizes(obj: Any, where: str) -> None:
    """Every int field named in LIMITS is an int in 1..limit (one line naming the field)."""
    for f in dataclasses.fields(obj):
        if f.name in LIMITS:
            number(f"{where} {f.name}", getattr(obj, f.name), integer=True, low=1, high=LIMITS[f.name])


def int_field(d: Mapping[str, Any], key: str, default: Any) -> int:
    """`d[key]` (or the default when absent) as an int; null, text, 2.5, true are refused by name."""
    return number(f"config field {key}", d.get(key, default), integer=True)


def float_field(d: Mapping[str, Any], key: str, default: Any) -> float:
    return number(f"config field {key}", d.get(key, default))

