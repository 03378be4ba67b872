"""Property tests (hypothesis): random bytes and random structures thrown at the GGUF reader, the
config and safetensors-index loaders and the image decoder. Each either loads or raises the
project's Gemma3LabError with a message: never another exception, never a hang (every example
has a deadline). A missing file stays FileNotFoundError, as everywhere in the loader."""

from __future__ import annotations

import io
import json
import struct
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gemma3_lab.config import Gemma3Config
from gemma3_lab.errors import Gemma3LabError
from gemma3_lab.loading.gguf import open_gguf, read_gguf_config
from gemma3_lab.loading.gguf_convert import check_tensors
from gemma3_lab.loading.hf import load_hf_state_dict, save_hf_folder
from gemma3_lab.prompt.images import load_image

FAST = settings(max_examples=120, deadline=2000, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


def refused_or_fine(fn, *allowed: type[BaseException]):
    """Run `fn`; a Gemma3LabError must carry a message; anything else but `allowed` fails the test."""
    try:
        return fn()
    except Gemma3LabError as e:
        assert str(e).strip(), "an error without a message"
    except allowed:
        pass


# --- GGUF -----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def gguf_file(tmp_path_factory) -> Path:
    """A valid tiny GGUF (a path: hypothesis prints arguments of failing examples)."""
    from test_bad_inputs import tiny_gguf

    return tiny_gguf(tmp_path_factory.mktemp("g") / "t.gguf", custom_alignment=32, sliding_window_pattern=6)


def read_gguf(data: bytes) -> None:
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "f.gguf"
        path.write_bytes(data)

        def run():
            g = open_gguf(path)
            check_tensors(g, read_gguf_config(g))

        refused_or_fine(run)


@FAST
@given(st.binary(max_size=512))
def test_gguf_random_bytes(data):
    read_gguf(data)
    read_gguf(b"GGUF" + struct.pack("<I", 3) + data)  # past the magic and the version


@FAST
@given(st.data())
def test_gguf_mutated_valid_file(gguf_file, data):
    """Byte edits and cuts of a valid tiny GGUF reach the metadata, tensor table and offsets."""
    buf = bytearray(gguf_file.read_bytes())
    header = min(len(buf), 2048)  # metadata and tensor infos live in the first ~2 KB
    for _ in range(data.draw(st.integers(1, 6))):
        at = data.draw(st.integers(0, header - 1))
        buf[at] = data.draw(st.integers(0, 255))
    cut = data.draw(st.one_of(st.none(), st.integers(0, len(buf))))
    read_gguf(bytes(buf if cut is None else buf[:cut]))


U32_KEYS = ["general.alignment", "gemma3.block_count", "gemma3.embedding_length", "gemma3.feed_forward_length",
            "gemma3.attention.head_count", "gemma3.attention.head_count_kv", "gemma3.attention.key_length",
            "gemma3.attention.sliding_window", "gemma3.context_length", "tokenizer.ggml.bos_token_id",
            "gemma3.attention.sliding_window_pattern"]


@FAST
@given(st.dictionaries(st.sampled_from(U32_KEYS), st.integers(0, 2**32 - 1) | st.integers(0, 70), max_size=4))
def test_gguf_metadata_values(gguf_file, values):
    """The tiny GGUF with any of its uint32 settings (sizes, heads, alignment, window) replaced."""
    from test_bad_inputs import patch_u32

    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "f.gguf"
        path.write_bytes(gguf_file.read_bytes())
        for key, v in values.items():
            patch_u32(path, key, v)
        read_gguf(path.read_bytes())


# --- config.json and the safetensors index -----------------------------------------------------------
JSON = st.recursive(st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats() | st.text(max_size=8),
                    lambda kids: st.lists(kids, max_size=3) | st.dictionaries(st.text(max_size=8), kids, max_size=3),
                    max_leaves=8)
KEYS = ["vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
        "num_key_value_heads", "head_dim", "query_pre_attn_scalar", "sliding_window", "sliding_window_pattern",
        "layer_types", "rope_parameters", "rope_scaling", "rope_theta", "rope_local_base_freq",
        "max_position_embeddings", "rms_norm_eps", "final_logit_softcapping", "pad_token_id", "bos_token_id",
        "eos_token_id", "text_config", "vision_config", "mm_tokens_per_image", "image_token_index"]
SMALL_INT = st.integers(-3, 70)
CONFIG = st.fixed_dictionaries(
    {"model_type": st.sampled_from(["gemma3_text", "gemma3", "llama"]) | JSON},
    optional={k: SMALL_INT | JSON for k in KEYS},
)


@FAST
@given(CONFIG)
def test_config_from_random_structures(d):
    refused_or_fine(lambda: Gemma3Config.from_hf(d))
    refused_or_fine(lambda: Gemma3Config.from_hf({"model_type": "gemma3", "text_config": d, "vision_config": d}))


@FAST
@given(st.binary(max_size=300) | JSON.map(lambda v: json.dumps(v).encode()))
def test_config_json_from_random_bytes(tmp_path, raw):
    (tmp_path / "config.json").write_bytes(raw)
    refused_or_fine(lambda: Gemma3Config.from_json(tmp_path / "config.json"))


@pytest.fixture(scope="module")
def index_folder(tmp_path_factory) -> Path:
    from test_bad_inputs import TEXT

    from gemma3_lab.explorer import Gemma3

    model = Gemma3(Gemma3Config(TEXT, name="tiny"))
    model.init_buffers()
    out = save_hf_folder(model.config, model.state_dict(), tmp_path_factory.mktemp("idx") / "tiny", max_shard_size="20KB")
    assert (out / "model.safetensors.index.json").is_file()
    return out


WEIGHT_MAP = JSON | st.dictionaries(st.text(max_size=12), st.text(max_size=12) | JSON, max_size=4) | st.just(None)


@settings(FAST, max_examples=60)
@given(st.fixed_dictionaries({}, optional={"weight_map": WEIGHT_MAP, "metadata": JSON}) | JSON)
def test_safetensors_index_from_random_structures(index_folder, index):
    path = index_folder / "model.safetensors.index.json"
    good = path.read_bytes()
    try:
        path.write_text(json.dumps(index))
        refused_or_fine(lambda: load_hf_state_dict(index_folder, progress=False), FileNotFoundError)
    finally:
        path.write_bytes(good)


# --- images ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def image_files() -> list[bytes]:
    from PIL import Image

    out = []
    for fmt, mode in [("PNG", "RGBA"), ("PNG", "P"), ("JPEG", "RGB"), ("GIF", "P"), ("BMP", "RGB"), ("WEBP", "RGB")]:
        buf = io.BytesIO()
        Image.new(mode, (20, 12), 90).save(buf, fmt)
        out.append(buf.getvalue())
    return out


@FAST
@given(st.binary(min_size=1, max_size=400))
def test_image_random_bytes(data):
    refused_or_fine(lambda: load_image(data))


@FAST
@given(st.data())
def test_image_mutated_valid_files(image_files, data):
    buf = bytearray(data.draw(st.sampled_from(image_files)))
    for _ in range(data.draw(st.integers(1, 8))):
        buf[data.draw(st.integers(0, len(buf) - 1))] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(1, len(buf)))
    img = refused_or_fine(lambda: load_image(bytes(buf[:cut])))
    assert img is None or img.mode == "RGB"
