"""gl.load's dispatch and errors, and the command line on the real model."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
import torch

import gemma3_lab as gl
from gemma3_lab.app.cli import main


def test_unknown_name_lists_the_choices():
    with pytest.raises(FileNotFoundError, match="demo-multimodal"):
        gl.load("gemma-17-huge")


def test_unknown_dtype_is_a_clear_error():
    with pytest.raises(ValueError, match="bfloat16"):
        gl.load(dtype="int3")


def test_cuda_without_cuda_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # as on a machine without CUDA
    with pytest.raises(ValueError, match="CUDA"):
        gl.load(device="cuda")


def weights_only(real_folder, folder):
    """`folder` holding the real 270M's config and weights (hard-linked, else copied: the loader
    refuses symlinks that leave the folder) and no tokenizer."""
    folder.mkdir()
    for name in ("config.json", "model.safetensors"):
        try:
            os.link(real_folder / name, folder / name)
        except OSError:  # another file system
            shutil.copy(real_folder / name, folder / name)
    return folder


@pytest.mark.real
def test_folder_without_tokenizer_names_the_folder(real_folder, tmp_path):
    folder = weights_only(real_folder, tmp_path / "no-tok")
    with pytest.raises(FileNotFoundError, match="no-tok.*tokenizer"):
        gl.load(folder)


@pytest.mark.real
def test_tokenizer_is_parsed_on_first_use(real_folder, tmp_path):
    """gl.load maps the weights and defers the 2-3 s tokenizer.json parse; a broken file fails then, by name."""
    folder = weights_only(real_folder, tmp_path / "bad-tok")
    (folder / "tokenizer.json").write_text("{not json")
    m = gl.load(folder, progress=False)
    with torch.no_grad():
        assert m(torch.tensor([[2, 818]])).logits.shape == (1, 2, 262_144)  # ids need no tokenizer
    with pytest.raises(ValueError, match="bad-tok.*not a tokenizers tokenizer.json"):
        m.generate("hello", max_new_tokens=1)
    good = gl.load(real_folder, progress=False)
    assert "_tokenizer" in good.__dict__ and not hasattr(good.__dict__["_tokenizer"], "encode")  # not parsed yet
    assert good.tokenizer.encode("The capital of France is") == [2, 818, 5279, 529, 7001, 563]
    assert good.tokenizer is good.tokenizer  # parsed once


@pytest.mark.real
def test_warm_load_builds_without_torch_dynamo(real_model):
    """A warm load reads the cached conversion and builds on the meta device. Any meta-device arithmetic
    (an init's normal_, a RoPE arange) runs through torch._refs and imports torch._dynamo: 3 of the 3.5 s
    a warm load used to take. Checked by module presence, not by a clock."""
    code = ("import sys, gemma3_lab as gl; m = gl.load(progress=False); "
            "print('torch._dynamo' in sys.modules, type(m.__dict__['_tokenizer']).__name__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", "partial"]  # and the tokenizer is not parsed yet


@pytest.mark.real
def test_folder_and_gguf_load_the_same_model(real_model, real_folder):
    m = gl.load(real_folder, progress=False)
    ids = torch.tensor([[2, 818, 5279, 529, 7001, 563]])
    with torch.no_grad():
        assert torch.equal(m(ids).logits, real_model(ids).logits)
    assert "gemma-3-270m" in real_model.describe() and "text-only" in real_model.describe()


def test_help_lists_the_commands(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for cmd in ("generate", "compare", "masks", "verify", "convert", "info"):
        assert cmd in out


def test_cli_reports_errors_without_traceback(capsys):
    assert main(["info", "--model", "/nonexistent/folder"]) == 2
    assert "error:" in capsys.readouterr().err
    assert main(["compare", "Hello", "--tokens", "0"]) == 2  # refused before loading anything
    assert capsys.readouterr().err.strip() == "error: --tokens must be at least 1, not 0"


@pytest.mark.real
def test_cli_compare_prints_the_librarys_divergence_and_comparison(capsys, real_model):
    """`compare` prints both greedy texts, `greedy_divergence`'s summary and `compare`'s, each
    the library's own on the same two models."""
    from gemma3_lab.analysis.compare import compare, greedy_divergence, load_precision

    assert main(["compare", "Once upon a time", "--b", "int8", "--tokens", "10"]) == 0
    out = capsys.readouterr()
    int8 = load_precision(precision="int8", progress=False)
    d = greedy_divergence(real_model, int8, "Once upon a time", 10, ("float32", "int8"))
    lines = out.out.splitlines()
    assert lines[0] == f"  float32: {real_model.tokenizer.decode(d.a_ids)!r}"
    assert lines[1] == f"     int8: {real_model.tokenizer.decode(d.b_ids)!r}"
    assert lines[2] == d.summary()
    assert out.out.rstrip().endswith(compare(real_model, int8, "Once upon a time", ("float32", "int8")).summary())
    assert "[B: gemma-3-270m" in out.err and "int8/row" in out.err


@pytest.mark.real
def test_cli_generate_streams_the_library_greedy_text(real_model, real_folder):
    expected = real_model.generate("The capital of France is", max_new_tokens=8).text
    out = subprocess.run(
        [sys.executable, "-m", "gemma3_lab", "generate", "The capital of France is", "--max-new-tokens", "8",
         "--compile"],
        capture_output=True, text=True, timeout=300,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == expected.strip()  # the compiled (or native) step's greedy text is the lean step's
    from gemma3_lab.model import native_decode

    if native_decode.why_not(real_model) is None:  # the native step runs it: nothing to compile
        assert "[nothing to compile: the native decode step (C) runs this model]" in out.stderr
        assert "tok/s, decode step: native]" in out.stderr
    else:
        assert "[compiled decode step ready (compiled in" in out.stderr
        assert "tok/s, decode step: compiled]" in out.stderr


@pytest.mark.real
def test_cli_generate_quantized(capsys, monkeypatch):
    """The CLI streams what generate returns on the model it quantized (quantized once: the
    calibrated int4 ranges take 15 s)."""
    from gemma3_lab.app import cli

    built = []
    load = cli._load
    monkeypatch.setattr(cli, "_load", lambda args: built.append(load(args)) or built[-1])
    assert main(["generate", "Hello", "--max-new-tokens", "4", "--quantize", "int4", "--group-size", "64"]) == 0
    out = capsys.readouterr()
    assert out.out.strip() == built[0].generate("Hello", max_new_tokens=4).text.strip()
    assert "int4/g64 +int8 embedding g32 +int4 head screen calibrated weight-only" in out.err and "268M params" in out.err
    from gemma3_lab.model import native_decode

    # the native step reads the codes where it applies; else the packed kernels' lean step (never compiled here)
    assert f"decode step: {'native' if native_decode.why_not(built[0]) is None else 'lean'}" in out.err
    with pytest.raises(SystemExit) as exit_:
        main(["generate", "Hello", "--compile", "--plain"])  # one or the other
    assert exit_.value.code == 2 and "not allowed with argument" in capsys.readouterr().err


def test_cli_verify_agrees_with_transformers(capsys, real_folder):
    assert main(["verify", "--model", str(real_folder), "--tokens", "8"]) == 0
    out = capsys.readouterr().out
    assert "greedy continuation identical: True" in out
