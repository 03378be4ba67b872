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
