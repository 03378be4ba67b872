"""Named presets for the published sizes, each with the checkpoint it was read from."""

from __future__ import annotations

from gemma3_lab.config.model import BUNDLED, Gemma3Config
from gemma3_lab.config.text import RopeConfig, TextConfig, pattern_layer_types
from gemma3_lab.config.vision import VisionConfig

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
