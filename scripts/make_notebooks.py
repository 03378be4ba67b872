"""Build the walkthrough notebooks from their sources and execute them in place with outputs.

    python scripts/make_notebooks.py              # build + execute all, save with outputs
    python scripts/make_notebooks.py 02 04        # only notebooks whose name starts with these
    python scripts/make_notebooks.py --no-execute # build only (no outputs)

Sources are `notebooks/src/NN_name.py` in the "percent" format: `# %% [markdown]` starts a
markdown cell whose lines are `# `-commented, `# %%` a code cell. Notebooks run with
`notebooks/` as their working directory (they read `data/`, and write nothing).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import nbformat

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = ROOT / "notebooks"
SOURCES = NOTEBOOKS / "src"
TIMEOUT = 600  # seconds per cell; a loaded CI machine can be several times slower than idle


def parse_cells(text: str) -> list:
    """Percent-format source -> nbformat cells."""
    cells, kind, lines = [], None, []

    def flush():
        body = "\n".join(lines).strip("\n")
        if kind == "markdown":
            body = "\n".join(ln[2:] if ln.startswith("# ") else ln.lstrip("#") for ln in body.splitlines())
            cells.append(nbformat.v4.new_markdown_cell(body))
        elif kind == "code" and body:
            cells.append(nbformat.v4.new_code_cell(body))

    for line in text.splitlines():
        if line.startswith("# %%"):
            flush()
            kind, lines = ("markdown" if "[markdown]" in line else "code"), []
        elif kind is not None:
            lines.append(line)
    flush()
    return cells


def build(src: Path) -> nbformat.NotebookNode:
    nb = nbformat.v4.new_notebook()
    nb.cells = parse_cells(src.read_text())
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.metadata["language_info"] = {"name": "python"}
    for i, cell in enumerate(nb.cells):  # stable ids keep diffs small between rebuilds
        cell["id"] = f"{src.stem[:2]}-{i:02d}"
    return nb


def execute(nb: nbformat.NotebookNode, timeout: int = TIMEOUT, env: dict[str, str] | None = None) -> float:
    """Run every cell (in `notebooks/`), filling in the outputs; returns the wall time in seconds.
    `env` adds to the kernel's environment. Raises nbclient's CellExecutionError on the first
    cell that fails."""
    from nbclient import NotebookClient

    client = NotebookClient(nb, timeout=timeout, kernel_name="python3", record_timing=False,
                            resources={"metadata": {"path": str(NOTEBOOKS)}})
    # idle OpenMP threads sleep instead of spinning: on a shared machine (CI, other jobs) spinning
    # threads fight for the cores and a forward pass can take several times longer
    env = {**os.environ, "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE"), **(env or {})}
    t0 = time.perf_counter()
    client.execute(env=env)
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("only", nargs="*", help="name prefixes, e.g. 01 03")
    ap.add_argument("--no-execute", action="store_true", help="write the notebooks without running them")
    args = ap.parse_args(argv)
    sources = sorted(p for p in SOURCES.glob("[0-9][0-9]_*.py") if not args.only or p.stem.startswith(tuple(args.only)))
    if not sources:
        print(f"no notebook sources match {args.only} in {SOURCES}", file=sys.stderr)
        return 1
    for src in sources:
        nb = build(src)
        out = NOTEBOOKS / f"{src.stem}.ipynb"
        if not args.no_execute:
            print(f"executing {out.name} ...", flush=True)
            seconds = execute(nb)
            print(f"  {out.name}: {seconds:.0f} s", flush=True)
        nbformat.write(nb, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
