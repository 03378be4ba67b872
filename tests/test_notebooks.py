"""Every walkthrough notebook runs top to bottom without an error, and the committed notebooks
are what their sources in notebooks/src build (regenerate: python scripts/make_notebooks.py)."""

from __future__ import annotations

import importlib.util
import shutil
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))
LIMIT_S = 600  # per notebook; each takes well under 3 minutes on an idle 2-core machine


def _maker():
    spec = importlib.util.spec_from_file_location("make_notebooks", ROOT / "scripts" / "make_notebooks.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("make_notebooks", mod)
    spec.loader.exec_module(mod)
    return mod


def test_every_source_has_a_notebook():
    sources = sorted(p.stem for p in (ROOT / "notebooks" / "src").glob("[0-9][0-9]_*.py"))
    assert sources and sources == [p.stem for p in NOTEBOOKS]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_committed_notebook_matches_its_source(path):
    nbformat = pytest.importorskip("nbformat")
    built = _maker().build(ROOT / "notebooks" / "src" / f"{path.stem}.py")
    committed = nbformat.read(path, as_version=4)
    assert [(c.cell_type, c.source) for c in committed.cells] == [(c.cell_type, c.source) for c in built.cells], (
        f"{path.name} differs from notebooks/src/{path.stem}.py: run python scripts/make_notebooks.py {path.stem[:2]}")
    assert all(c.outputs for c in committed.cells if c.cell_type == "code" and _prints(c.source)), (
        f"{path.name} is committed without outputs: run python scripts/make_notebooks.py {path.stem[:2]}")


def _prints(source: str) -> bool:
    return "print(" in source or "fig = " in source


@pytest.mark.notebooks
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs(path, tmp_path, capsys):
    """Execute a temporary copy (the committed file is never touched); fail on any cell error."""
    nbformat = pytest.importorskip("nbformat")
    pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    copy = tmp_path / path.name
    shutil.copy(path, copy)
    nb = nbformat.read(copy, as_version=4)
    t0 = time.perf_counter()
    _maker().execute(nb, timeout=LIMIT_S)  # runs in notebooks/, where the notebook reads data/
    seconds = time.perf_counter() - t0
    with capsys.disabled():
        print(f"\n{path.name}: {seconds:.0f} s", flush=True)
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert not errors, errors
    assert seconds < LIMIT_S, f"{path.name} took {seconds:.0f} s (limit {LIMIT_S} s)"


@pytest.mark.notebooks
@pytest.mark.oracle
def test_images_notebook_switches_to_a_4b_folder(tmp_path, real_folder):
    """With GEMMA3_4B_DIR set, notebook 03 runs on that folder instead of demo-multimodal: here a
    tiny random checkpoint in the Gemma 3 4B layout (262208-row vocabulary, the real tokenizer
    plus <image_soft_token>, 16 soft tokens per image), written by transformers."""
    nbformat = pytest.importorskip("nbformat")
    transformers = pytest.importorskip("transformers")
    import torch
    from tokenizers import AddedToken

    from gemma3_lab.prompt.tokenizer import Tokenizer

    text = dict(vocab_size=262_208, hidden_size=64, intermediate_size=96, num_hidden_layers=6, num_attention_heads=4,
                num_key_value_heads=2, head_dim=16, sliding_window=512, query_pre_attn_scalar=16)
    vision = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, image_size=56,
                  patch_size=7, vision_use_head=False)
    torch.manual_seed(0)
    hf = transformers.Gemma3ForConditionalGeneration(
        transformers.Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=16)).eval()
    folder = tmp_path / "gemma-3-4b-tiny"
    hf.save_pretrained(folder)
    tok = Tokenizer.from_file(real_folder / "tokenizer.json")
    tok.backend.add_special_tokens([AddedToken("<image_soft_token>", normalized=False, special=True)])
    tok.save(folder)

    path = ROOT / "notebooks" / "03_images_as_tokens.ipynb"
    nb = nbformat.read(path, as_version=4)
    _maker().execute(nb, timeout=LIMIT_S, env={"GEMMA3_4B_DIR": str(folder)})
    first = "".join(o.get("text", "") for o in nb.cells[1].outputs)
    assert "gemma-3-4b-tiny" in first and "UNTRAINED" not in first
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert not errors, errors
