"""What a newcomer types first: `python app.py --help`, the device check on a machine without the
device, the command line's help and the README's `convert` example, the load progress bar."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors import safe_open

import gemma3_lab as gl
from gemma3_lab.app.cli import build_parser, main
from gemma3_lab.app.ui.registry import MEMORY_ENV, ROOT_ENV

ROOT = Path(__file__).resolve().parents[1]


def test_app_help_prints_usage_and_exits_without_serving():
    """Were the server started, this would not return before the timeout."""
    out = subprocess.run([sys.executable, "app.py", "--help"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("usage: python app.py")
    for name in ("--port", "GRADIO_SERVER_PORT", ROOT_ENV, MEMORY_ENV, "GEMMA3_LAB_CACHE"):
        assert name in out.stdout
    assert "Running on" not in out.stdout + out.stderr


def test_device_check_without_cuda_says_so_in_one_line():
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}  # no CUDA device, on any machine
    out = subprocess.run([sys.executable, "scripts/device_check.py", "--device", "cuda"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 2
    assert out.stdout == ""
    assert out.stderr.splitlines() == [
        "error: --device cuda: device='cuda' was asked for but torch sees no CUDA device (use 'cpu' or 'auto')"
    ]


def parsers(parser: argparse.ArgumentParser):
    yield parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                yield from parsers(sub)


def test_every_cli_argument_has_help_and_defaults_are_shown(capsys):
    every = list(parsers(build_parser()))
    assert {p.prog.split()[-1] for p in every[1:]} == {"generate", "compare", "masks", "verify", "convert", "info"}
    for p in every:
        for a in p._actions:
            assert a.help and a.help.strip(), f"{p.prog}: {a.option_strings or a.dest} has no help"
    with pytest.raises(SystemExit) as e:
        main(["generate", "--help"])
    assert e.value.code == 0
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    assert "(default: 64)" in text and "(default: gemma-3-270m)" in text
    assert "(default: None)" not in text and "(default: False)" not in text


def test_convert_of_a_missing_file_is_one_error_line(tmp_path, capsys):
    assert main(["convert", str(tmp_path / "nothing.gguf"), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "nothing.gguf" in err and len(err.splitlines()) == 1


@pytest.mark.real
def test_readme_convert_example_converts_the_bundled_model(real_folder, tmp_path, capsys):
    """`python -m gemma3_lab convert gemma-3-270m OUT` writes the same tensors as the cached conversion."""
    out = tmp_path / "gemma-3-270m-hf"
    assert main(["convert", "gemma-3-270m", str(out)]) == 0
    assert capsys.readouterr().out.strip() == f"wrote {out}"
    with safe_open(out / "model.safetensors", "pt") as got, safe_open(real_folder / "model.safetensors", "pt") as want:
        assert sorted(got.keys()) == sorted(want.keys())
        for k in want.keys():
            assert got.get_tensor(k).equal(want.get_tensor(k)), k
    assert (out / "config.json").read_text() == (real_folder / "config.json").read_text()


@pytest.mark.real
def test_progress_bar_names_the_model_not_the_cache_folder(real_folder, capsys):
    gl.load(progress=True)
    err = capsys.readouterr().err
    assert "loading gemma-3-270m: " in err
    assert real_folder.name not in err
