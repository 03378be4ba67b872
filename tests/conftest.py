"""Shared fixtures: the real bundled 270M (ours and transformers' on the same converted
folder) loaded once per session, and tiny random checkpoints written by transformers."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

DATA = Path(__file__).parent / "data"
REAL_FIXTURES = ("real_folder", "real_model", "hf_eager", "hf_sdpa")


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects, so `-m "not real"` sees these marks
def pytest_collection_modifyitems(items):
    """A test that uses the real 270M, directly or through a fixture built on it, is marked `real`:
    the fast tier (`-m "not real and not browser and not notebooks"`) never loads the model."""
    for item in items:
        if any(name in item.fixturenames for name in REAL_FIXTURES):
            item.add_marker(pytest.mark.real)


@pytest.fixture(scope="session")
def long_prompt() -> str:
    return (DATA / "long_prompt.txt").read_text()


@pytest.fixture(scope="session")
def real_folder() -> Path:
    """The bundled GGUF converted once to an HF folder (in the user cache, reused across runs)."""
    from gemma3_lab.load import bundled_gguf_path
    from gemma3_lab.loading.gguf_convert import cached_conversion

    return cached_conversion(bundled_gguf_path(), progress=False)


@pytest.fixture(scope="session")
def real_model(real_folder):
    import gemma3_lab as gl

    return gl.load(progress=False)


@pytest.fixture(scope="session")
def int4_model(real_folder):
    """load's int4 default (calibrated ranges: 15 s to make), shared by the files that read it."""
    import gemma3_lab as gl

    return gl.load(quantize="int4", progress=False)


def _hf(folder, impl):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation=impl).eval()


@pytest.fixture(scope="session")
def hf_eager(real_folder):
    return _hf(real_folder, "eager")


@pytest.fixture(scope="session")
def hf_sdpa(real_folder):
    return _hf(real_folder, "sdpa")


@pytest.fixture(scope="session")
def tiny_gqa():
    """A random 3-layer model with grouped-query attention (4 query heads, 2 kv heads), a
    4-token window and norm offsets away from zero so every (1 + w) gain is visible."""
    import gemma3_lab as gl
    from gemma3_lab.config import Gemma3Config, TextConfig, pattern_layer_types

    torch.manual_seed(0)
    text = TextConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=3, num_heads=4, num_kv_heads=2,
                      head_dim=16, query_pre_attn_scalar=16, sliding_window=4, layer_types=pattern_layer_types(3, 2),
                      max_position_embeddings=64)
    model = gl.Gemma3(Gemma3Config(text, name="tiny-gqa")).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.normal_(0, 0.3)
    return model
