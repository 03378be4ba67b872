"""Hugging Face checkpoint loading and saving, against tiny random transformers models saved to disk."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from gemma3_lab.loading.hf import expected_shapes, find_tokenizer, load_hf_state_dict, save_hf_folder

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.oracle

TEXT = dict(
    vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=6, num_attention_heads=2,
    num_key_value_heads=1, head_dim=16, sliding_window=8, max_position_embeddings=128,
)
# image 28 / patch 7 = 4 patches a side; sqrt(4 tokens) = 2 a side, so the projector pools 2x2.
VISION = dict(
    hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=28,
    patch_size=7, vision_use_head=False,
)
MM = dict(mm_tokens_per_image=4, boi_token_index=508, eoi_token_index=509, image_token_index=510)


# --- an independent oracle: internal name -> transformers 5.x in-memory name ------------------
_ORACLE = [
    (r"embed\.weight", "embed_tokens.weight"),
    (r"final_norm\.weight", "norm.weight"),
    (r"blocks\.(\d+)\.pre_attention_norm\.", r"layers.\1.input_layernorm."),
    (r"blocks\.(\d+)\.post_attention_norm\.", r"layers.\1.post_attention_layernorm."),
    (r"blocks\.(\d+)\.pre_ffw_norm\.", r"layers.\1.pre_feedforward_layernorm."),
    (r"blocks\.(\d+)\.post_ffw_norm\.", r"layers.\1.post_feedforward_layernorm."),
    (r"blocks\.(\d+)\.attn\.", r"layers.\1.self_attn."),
    (r"blocks\.(\d+)\.mlp\.", r"layers.\1.mlp."),
]


def hf_memory_name(name: str, multimodal: bool) -> str:
    if name in ("lm_head.weight", "score.weight"):
        return name
    if name.startswith("projector."):
        return "model.multi_modal_projector." + name.removeprefix("projector.")
    if name.startswith("vision."):
        rest = name.removeprefix("vision.")
        rest = re.sub(r"^(patch_embedding|position_embedding)", r"embeddings.\1", rest)
        rest = re.sub(r"^blocks\.(\d+)\.attn\.", r"encoder.layers.\1.self_attn.", rest)
        rest = re.sub(r"^blocks\.", "encoder.layers.", rest)
        return "model.vision_tower." + rest
    for pat, rep in _ORACLE:
        name = re.sub("^" + pat, rep, name)
    return ("model.language_model." if multimodal else "model.") + name


def assert_matches_hf(state: dict, hf_model, multimodal: bool, dtype=torch.float32) -> None:
    hf = hf_model.state_dict()
    for name, t in state.items():
        ref = hf[hf_memory_name(name, multimodal)]
        assert t.dtype == dtype, name
        assert torch.equal(t, ref.to(dtype)), name


def file_keys(folder: Path) -> set[str]:
    keys = set()
    for f in folder.glob("*.safetensors"):
        with safe_open(str(f), "pt") as h:
            keys |= set(h.keys())
    return keys


def resave(src: Path, dst: Path, rename=lambda k: k, extra: dict | None = None, drop=()) -> Path:
    """Copy a single-file checkpoint with its keys renamed: how we build layouts transformers no longer writes."""
    dst.mkdir(parents=True, exist_ok=True)
    shutil.copy(src / "config.json", dst / "config.json")
    with safe_open(str(src / "model.safetensors"), "pt") as f:
        tensors = {rename(k): f.get_tensor(k).clone() for k in f.keys() if k not in drop}
    tensors.update(extra or {})
    save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


@pytest.fixture(scope="module")
def causal(tmp_path_factory):
    torch.manual_seed(0)
    model = transformers.Gemma3ForCausalLM(transformers.Gemma3TextConfig(**TEXT)).eval()
    path = tmp_path_factory.mktemp("causal")
    model.save_pretrained(path)
    return path, model


@pytest.fixture(scope="module")
def multimodal(tmp_path_factory):
    torch.manual_seed(1)
    cfg = transformers.Gemma3Config(text_config=TEXT, vision_config=VISION, **MM)
    model = transformers.Gemma3ForConditionalGeneration(cfg).eval()
    path = tmp_path_factory.mktemp("multimodal")
    model.save_pretrained(path)
    return path, model


# --- layouts ------------------------------------------------------------------------------
def test_causal_lm_layout(causal):
    path, model = causal
    keys = file_keys(path)
    assert "model.embed_tokens.weight" in keys and "lm_head.weight" not in keys  # tied head not written
    config, state = load_hf_state_dict(path)
    assert config.text.num_layers == 6 and config.text.global_layers == (5,) and not config.is_multimodal
    assert list(state) == list(expected_shapes(config))
    assert_matches_hf(state, model, multimodal=False)


def test_text_model_layout_has_no_prefix(tmp_path, causal):
    _, model = causal
    model.model.save_pretrained(tmp_path)  # Gemma3TextModel
    assert "embed_tokens.weight" in file_keys(tmp_path) and "norm.weight" in file_keys(tmp_path)
    _, state = load_hf_state_dict(tmp_path)
    assert_matches_hf(state, model, multimodal=False)


def test_untied_head_and_stored_tied_copy(tmp_path, causal):
    torch.manual_seed(2)
    untied = transformers.Gemma3ForCausalLM(transformers.Gemma3TextConfig(**TEXT, tie_word_embeddings=False))
    untied.save_pretrained(tmp_path / "untied")
    config, state = load_hf_state_dict(tmp_path / "untied")
    assert not config.text.tie_word_embeddings and "lm_head.weight" in state
    assert_matches_hf(state, untied, multimodal=False)
    # a tied checkpoint that stores the head anyway: the copy is dropped
    path, model = causal
    extra = {"lm_head.weight": model.lm_head.weight.detach().clone()}
    _, state = load_hf_state_dict(resave(path, tmp_path / "tied_copy", extra=extra))
    assert "lm_head.weight" not in state


def test_sequence_classification_text(tmp_path):
    torch.manual_seed(3)
    model = transformers.Gemma3TextForSequenceClassification(transformers.Gemma3TextConfig(**TEXT, num_labels=3))
    model.save_pretrained(tmp_path)
    assert "score.weight" in file_keys(tmp_path) and "model.norm.weight" in file_keys(tmp_path)
    config, state = load_hf_state_dict(tmp_path)
    assert state["score.weight"].shape == (3, 64) and list(state) == list(expected_shapes(config, 3))
    assert_matches_hf(state, model, multimodal=False)


def test_sequence_classification_multimodal(tmp_path):
    torch.manual_seed(4)
    cfg = transformers.Gemma3Config(text_config=TEXT, vision_config=VISION, num_labels=3, **MM)
    model = transformers.Gemma3ForSequenceClassification(cfg)
    model.save_pretrained(tmp_path)
    assert {"score.weight", "language_model.model.norm.weight"} <= file_keys(tmp_path)
    config, state = load_hf_state_dict(tmp_path)
    assert config.is_multimodal and list(state) == list(expected_shapes(config, 3))
    assert_matches_hf(state, model, multimodal=True)


def _original_hub(k: str) -> str:  # v4.50-era Hub files: vision_tower.vision_model.*
    return k.replace("vision_tower.", "vision_tower.vision_model.", 1)


def _current(k: str, vision_model: bool = False) -> str:  # model.language_model.* (GH converter adds vision_model.)
    k = re.sub(r"^language_model\.model\.", "model.language_model.", k)
    k = re.sub(r"^vision_tower\.", "model.vision_tower.vision_model." if vision_model else "model.vision_tower.", k)
    return re.sub(r"^multi_modal_projector\.", "model.multi_modal_projector.", k)


@pytest.mark.parametrize("layout", ["save_pretrained", "original_hub", "current", "current_vision_model"])
def test_multimodal_layouts(tmp_path, multimodal, layout):
    path, model = multimodal
    embed = model.model.language_model.embed_tokens.weight.detach().clone()
    if layout == "save_pretrained":
        # what transformers 5.24 writes for a model built from scratch (docs/gemma3.md §6)
        keys = file_keys(path)
        assert "language_model.model.embed_tokens.weight" in keys
        assert "vision_tower.encoder.layers.0.mlp.fc1.weight" in keys
        assert "multi_modal_projector.mm_input_projection_weight" in keys
        folder = path
    elif layout == "original_hub":
        folder = resave(path, tmp_path, _original_hub, extra={"language_model.lm_head.weight": embed})
    elif layout == "current":
        folder = resave(path, tmp_path, _current, extra={"lm_head.weight": embed})
    else:
        folder = resave(path, tmp_path, lambda k: _current(k, vision_model=True))
    config, state = load_hf_state_dict(folder)
    assert config.is_multimodal and config.vision.num_patches == 16 and config.mm_tokens_per_image == 4
    assert list(state) == list(expected_shapes(config))
    assert state["projector.mm_input_projection_weight"].shape == (32, 64)
    assert_matches_hf(state, model, multimodal=True)


def test_transformers_unconverted_names_load(tmp_path, multimodal):
    _, model = multimodal
    model.save_pretrained(tmp_path, save_original_format=False)
    assert "model.language_model.norm.weight" in file_keys(tmp_path)
    assert_matches_hf(load_hf_state_dict(tmp_path)[1], model, multimodal=True)


def test_siglip_pooling_head_is_dropped(tmp_path, multimodal):
    path, model = multimodal
    folder = resave(path, tmp_path, extra={"vision_tower.head.probe": torch.zeros(1, 1, 32)})
    _, state = load_hf_state_dict(folder)
    assert not any(".head." in n for n in state)


def test_sharded_transformers_folder(tmp_path, multimodal):
    _, model = multimodal
    model.save_pretrained(tmp_path, max_shard_size="50KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 1
    assert_matches_hf(load_hf_state_dict(tmp_path, progress=False)[1], model, multimodal=True)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", torch.bfloat16, torch.float16])
def test_dtype_casts(causal, dtype):
    path, model = causal
    _, state = load_hf_state_dict(path, dtype=dtype)
    assert_matches_hf(state, model, multimodal=False, dtype=getattr(torch, str(dtype).removeprefix("torch.")))



def _file_backed(t: torch.Tensor) -> str | None:
    """The file whose mapping holds t's first byte (None: the process's own memory)."""
    addr = t.data_ptr()
    for line in Path("/proc/self/maps").read_text().splitlines():
        span, *rest = line.split()
        lo, hi = (int(v, 16) for v in span.split("-"))
        if lo <= addr < hi:
            return rest[4] if len(rest) > 4 and rest[4].startswith("/") else None
    return None


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs Linux's /proc to see mappings")
def test_weights_leave_the_mapped_file_unless_asked(causal, monkeypatch):
    """float32 weights stored as float32 are copied into process memory (a decode step reads
    them every token, and the page cache's pages read slower); GEMMA3_LAB_MAPPED_WEIGHTS=1, or
    a checkpoint over half the available memory, keeps them mapped. The values are the file's."""
    from gemma3_lab.loading import hf

    path, model = causal
    _, state = load_hf_state_dict(path)
    assert all(_file_backed(t) is None for t in state.values())
    assert_matches_hf(state, model, multimodal=False)
    monkeypatch.setenv("GEMMA3_LAB_MAPPED_WEIGHTS", "1")
    _, mapped = load_hf_state_dict(path)
    assert {_file_backed(t) for t in mapped.values()} == {str(path / "model.safetensors")}
    assert all(torch.equal(mapped[n], state[n]) for n in state)
    monkeypatch.delenv("GEMMA3_LAB_MAPPED_WEIGHTS")
    assert hf._copy_pays(1) and not hf._copy_pays(10**15)

# --- round trip ---------------------------------------------------------------------------
@pytest.mark.parametrize("shard", [None, "20KB"])
def test_round_trip_multimodal(tmp_path, multimodal, shard):
    config, state = load_hf_state_dict(multimodal[0])
    out = save_hf_folder(config, state, tmp_path / "out", max_shard_size=shard)
    assert (out / "model.safetensors.index.json").is_file() == (shard is not None)
    assert "model.language_model.embed_tokens.weight" in file_keys(out)
    config2, state2 = load_hf_state_dict(out, progress=False)
    assert config2.replace(name=config.name) == config
    assert state2.keys() == state.keys() and all(torch.equal(state2[n], state[n]) for n in state)
    # transformers reads our folder back to the same weights
    hf = transformers.Gemma3ForConditionalGeneration.from_pretrained(out)
    assert_matches_hf(state, hf, multimodal=True)
    assert torch.equal(hf.lm_head.weight, hf.model.language_model.embed_tokens.weight)


def test_round_trip_text_and_classifier(tmp_path, causal):
    config, state = load_hf_state_dict(causal[0])
    save_hf_folder(config, state, tmp_path, max_shard_size="20KB")
    save_hf_folder(config, state, tmp_path)  # re-saving unsharded removes the stale shards
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]
    assert_matches_hf(state, transformers.Gemma3ForCausalLM.from_pretrained(tmp_path), multimodal=False)

    state["score.weight"] = torch.randn(5, 64)
    save_hf_folder(config, state, tmp_path / "cls")
    _, state2 = load_hf_state_dict(tmp_path / "cls")
    assert torch.equal(state2["score.weight"], state["score.weight"])
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "cls")
    assert type(hf).__name__ == "Gemma3TextForSequenceClassification"
    assert_matches_hf(state, hf, multimodal=False)


def test_progress_bar_on_stderr(tmp_path, causal, capsys):
    config, state = load_hf_state_dict(causal[0])
    save_hf_folder(config, state, tmp_path, max_shard_size="20KB")
    load_hf_state_dict(tmp_path)
    assert "loading" in capsys.readouterr().err


# --- errors -------------------------------------------------------------------------------
def test_missing_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nope: checkpoint folder not found"):
        load_hf_state_dict(tmp_path / "nope")


def test_missing_or_foreign_config(tmp_path, causal):
    folder = tmp_path / "ckpt"
    folder.mkdir()
    shutil.copy(causal[0] / "model.safetensors", folder)
    with pytest.raises(FileNotFoundError, match=r"ckpt/config.json: config.json not found"):
        load_hf_state_dict(folder)
    (folder / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ValueError, match=r"config.json: .*'llama'.*gemma3"):
        load_hf_state_dict(folder)


@pytest.mark.parametrize(
    "weights, error, message",
    [
        ({"pytorch_model.bin": b""}, FileNotFoundError,
         r"no model\.safetensors or model\.safetensors\.index\.json \(found pytorch_model\.bin"),
        ({"model.safetensors": b"\x00garbage"}, ValueError, r"model\.safetensors: not a readable safetensors file"),
    ],
)
def test_no_or_unreadable_safetensors(tmp_path, causal, weights, error, message):
    shutil.copy(causal[0] / "config.json", tmp_path)
    for name, data in weights.items():
        (tmp_path / name).write_bytes(data)
    with pytest.raises(error, match=rf"{tmp_path}.*{message}"):
        load_hf_state_dict(tmp_path)


def test_absent_shard(tmp_path, causal):
    config, state = load_hf_state_dict(causal[0])
    save_hf_folder(config, state, tmp_path, max_shard_size="20KB")
    victim = sorted(tmp_path.glob("model-*.safetensors"))[1]
    victim.unlink()
    with pytest.raises(FileNotFoundError, match=rf"model\.safetensors\.index\.json names .*{victim.name}"):
        load_hf_state_dict(tmp_path)


def test_wrong_shape(tmp_path, causal):
    key = "model.layers.2.self_attn.q_proj.weight"
    folder = resave(causal[0], tmp_path, extra={key: torch.zeros(16, 64)})
    with pytest.raises(ValueError) as e:
        load_hf_state_dict(folder)
    msg = str(e.value)
    assert "wrong shape" in msg and f"blocks.2.attn.q_proj.weight ({key} in model.safetensors)" in msg
    assert "expected (32, 64)" in msg and "got (16, 64)" in msg and str(tmp_path) in msg


def test_missing_and_unexpected(tmp_path, causal):
    extra = {f"model.extra.{i}.weight": torch.zeros(1) for i in range(12)}
    folder = resave(causal[0], tmp_path, extra=extra, drop={"model.layers.3.mlp.up_proj.weight"})
    with pytest.raises(ValueError) as e:
        load_hf_state_dict(folder)
    msg = str(e.value)
    assert "1 missing tensor(s): blocks.3.mlp.up_proj.weight" in msg
    assert "12 unexpected tensor(s)" in msg and "model.extra.0.weight in model.safetensors" in msg
    assert "... and 2 more" in msg


def test_vision_weights_in_text_config_are_unexpected(tmp_path, causal):
    extra = {"vision_tower.post_layernorm.weight": torch.zeros(32)}
    with pytest.raises(ValueError, match=r"unexpected tensor\(s\): vision\.post_layernorm\.weight \(vision_tower\.post_layernorm\.weight in model\.safetensors\)"):
        load_hf_state_dict(resave(causal[0], tmp_path, extra=extra))


def test_two_names_for_one_parameter(tmp_path, causal):
    extra = {"norm.weight": torch.zeros(64)}
    with pytest.raises(ValueError, match=r"model\.safetensors: norm\.weight and model\.norm\.weight in model\.safetensors both map to final_norm\.weight"):
        load_hf_state_dict(resave(causal[0], tmp_path, extra=extra))


@pytest.mark.parametrize("dtype", ["int8", "fp32", torch.float64])
def test_unknown_dtype(causal, dtype):
    with pytest.raises(ValueError, match=r"unknown dtype .*valid: float32, bfloat16, float16"):
        load_hf_state_dict(causal[0], dtype=dtype)


def test_save_rejects_a_bad_state_dict(tmp_path, causal):
    config, state = load_hf_state_dict(causal[0])
    del state["final_norm.weight"]
    with pytest.raises(ValueError, match=r"(?s)state_dict .*missing tensor\(s\): final_norm\.weight"):
        save_hf_folder(config, state, tmp_path)


def test_find_tokenizer(tmp_path):
    with pytest.raises(FileNotFoundError, match=rf"{tmp_path}: no tokenizer\.json or tokenizer\.model"):
        find_tokenizer(tmp_path)
    (tmp_path / "tokenizer.model").write_bytes(b"")
    assert find_tokenizer(tmp_path) == tmp_path / "tokenizer.model"
    (tmp_path / "tokenizer.json").write_text("{}")
    assert find_tokenizer(tmp_path) == tmp_path / "tokenizer.json"
