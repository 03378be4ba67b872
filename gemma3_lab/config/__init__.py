"""Frozen configuration dataclasses for Gemma 3, one file per part: `text` (the decoder and
its layer pattern), `vision` (SigLIP), `model` (the whole, read from config.json), `presets`
(the published sizes), `checks` (the bounds and field readers they share); and `paths`, the
cache folder. Builders read Hugging Face `config.json` dicts (both `gemma3_text` and
`gemma3`, legacy keys included); the GGUF loader builds a `TextConfig` from its metadata."""

from gemma3_lab.config.checks import LIMITS
from gemma3_lab.config.model import BUNDLED, Gemma3Config, kv_heads_of
from gemma3_lab.config.paths import cache_root
from gemma3_lab.config.presets import (GEMMA3_1B, GEMMA3_4B, GEMMA3_12B, GEMMA3_27B, GEMMA3_270M,
                                       PRESETS)
from gemma3_lab.config.text import AttentionType, RopeConfig, TextConfig, pattern_layer_types
from gemma3_lab.config.vision import VisionConfig

__all__ = ["AttentionType", "BUNDLED", "GEMMA3_1B", "GEMMA3_4B", "GEMMA3_12B", "GEMMA3_27B", "GEMMA3_270M",
           "Gemma3Config", "LIMITS", "PRESETS", "RopeConfig", "TextConfig", "VisionConfig", "cache_root", "kv_heads_of",
           "pattern_layer_types"]
