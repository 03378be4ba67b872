"""The package's dependency rule, read from its own imports (docs/architecture.md draws it):

    errors  <-  config  <-  model  <-  prompt  <-  loading  <-  front door  <-  {analysis, viz}  <-  app
                                   <-  instrument  <-------------'
    (the front door: explorer, generate, load, classify; `loading` builds tokenizers, so it reads
    `prompt`; `instrument` and `prompt` do not know each other; config raises the project's error)

Nothing imports upward or sideways, there are no import circles, `model/masks.py` imports only
torch, and an import inside a function is there only to defer something on purpose (its line,
or the one above, says `deferred`)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parent.parent / "gemma3_lab"
FRONT = {"explorer", "generate", "generate_batch", "load", "classify"}
BASE = {"config", "errors"}
MAY_IMPORT = {
    "errors": set(), "config": {"errors"},  # config raises the project's error type for bad values
    "model": BASE,
    "prompt": BASE | {"model"},
    "instrument": BASE | {"model"},
    "loading": BASE | {"model", "prompt"},
    "front": BASE | {"model", "prompt", "instrument", "loading"},
    "analysis": BASE | {"model", "prompt", "instrument", "loading", "front"},
    "viz": BASE | {"model", "prompt", "instrument", "loading", "front"},
    "app": BASE | {"model", "prompt", "instrument", "loading", "front", "analysis", "viz"},
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PKG.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def part_of(module: str) -> str:
    """The room a module lives in: its folder under gemma3_lab, or 'front' for the front door."""
    rest = module.split(".")[1:]
    if not rest:
        return "front"  # `import gemma3_lab` reaches the front door's names
    if rest[0] == "__main__":
        return "app"
    if rest[0] in FRONT:
        return "front"
    return rest[0]


def imports(path: Path) -> list[tuple[str, int, bool]]:
    """(imported gemma3_lab module, line, inside a function) for every import in the file."""
    tree = ast.parse(path.read_text(), str(path))
    out = []

    def visit(node, nested: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inner = nested or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef))
            if isinstance(child, ast.ImportFrom) and child.module and child.level == 0:
                if child.module.split(".")[0] == "gemma3_lab":
                    out.append((child.module, child.lineno, nested))
            elif isinstance(child, ast.ImportFrom) and child.level:
                out.append(("<relative>", child.lineno, nested))
            elif isinstance(child, ast.Import):
                out.extend((a.name, child.lineno, nested) for a in child.names if a.name.split(".")[0] == "gemma3_lab")
            visit(child, inner)

    visit(tree, False)
    return out


FILES = sorted(p for p in PKG.rglob("*.py") if "__pycache__" not in p.parts)


def test_the_package_has_folders_per_concern():
    top = sorted(p.stem for p in PKG.glob("*.py"))
    assert set(top) <= {"__init__", "__main__", "errors", *FRONT}, top
    assert {p.name for p in PKG.iterdir() if p.is_dir() and p.name != "__pycache__"} == {
        "config", "model", "prompt", "instrument", "loading", "analysis", "viz", "app"}


@pytest.mark.parametrize("path", FILES, ids=lambda p: str(p.relative_to(PKG)))
def test_imports_follow_the_rule(path):
    here = module_name(path)
    room = part_of(here)
    text = path.read_text().splitlines()
    for target, line, nested in imports(path):
        assert target != "<relative>", f"{path.name}:{line}: use absolute gemma3_lab.* imports"
        there = part_of(target)
        if here == "gemma3_lab":  # the package facade re-exports the public names
            assert nested or there in MAY_IMPORT["front"] | {"front"}, f"__init__ imports {target} eagerly"
        elif there != room:
            assert there in MAY_IMPORT[room], f"{here} ({room}) imports {target} ({there}) against the rule"
        if nested:
            said = " ".join(text[max(0, line - 6):line]).lower()  # its line or the block's comment
            assert "deferred" in said, f"{path.relative_to(PKG)}:{line}: import of {target} inside a function " \
                                       "without a `deferred: why` comment"


def test_masks_import_only_torch():
    tree = ast.parse((PKG / "model" / "masks.py").read_text())
    names = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    names |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert names <= {"torch", "__future__", "dataclasses", "typing", "enum", "math"}, names


def test_no_import_circles():
    graph = {module_name(p): {t for t, _, nested in imports(p) if not nested} for p in FILES}
    known = set(graph)

    def resolve(t: str) -> str | None:
        while t and t not in known:
            t = t.rpartition(".")[0]
        return t or None

    edges = {m: {r for t in ts if (r := resolve(t)) and r != m and r != "gemma3_lab"} for m, ts in graph.items()}
    state: dict[str, int] = {}

    def walk(m: str, trail: list[str]) -> None:
        state[m] = 1
        for n in edges.get(m, ()):
            if state.get(n) == 1:
                raise AssertionError("import circle: " + " -> ".join(trail[trail.index(n):] + [n]))
            if n not in state:
                walk(n, trail + [n])
        state[m] = 2

    for m in edges:
        if m not in state:
            walk(m, [m])


def test_the_rule_checker_sees_a_violation(tmp_path):
    """The checker itself: a model file importing the app, and a nested import without a reason."""
    bad = tmp_path / "gemma3_lab" / "model" / "bad.py"
    bad.parent.mkdir(parents=True)
    bad.write_text("from gemma3_lab.app.cli import main\n\ndef f():\n    from gemma3_lab.config import X\n")
    found = [(part_of(t), nested) for t, _, nested in imports(bad)]
    assert found == [("app", False), ("config", True)]
    assert "app" not in MAY_IMPORT["model"]
