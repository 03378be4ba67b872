"""The models the app may run: the bundled names plus local folders under one allow-listed
root, each loaded once and shared read-only by every browser session.

A loaded model is used under its own lock: hooks are attached to the shared modules for
the length of a generation, so two sessions must not run the same model at once (a second
session waits for the first; sessions on different models run side by side).

The app does not compile decode steps (`Gemma3.compile_decode`): its two columns decode as
one batch of two, which takes the native step where it applies (`native_decode`: the two rows
in one C call a token, float32 weights read once for both) and else the eager lean step (the
compiled graph is one row's), so a compile would mostly cost a minute of both cores for
nothing. Each run's summary says which step ran.

Models are kept until their bytes pass a budget (half the machine's memory, or
$GEMMA3_LAB_MODEL_MEMORY_GB); then the least recently used ones that no request is
running are dropped, and loaded again if asked for later.
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

from gemma3_lab.analysis.compare import PRECISIONS as COMPARE_PRECISIONS
from gemma3_lab.analysis.compare import load_precision
from gemma3_lab.config import BUNDLED
from gemma3_lab.load import NAMES
from gemma3_lab.loading.quantize import tensor_bytes

ROOT_ENV = "GEMMA3_LAB_MODELS_ROOT"
MEMORY_ENV = "GEMMA3_LAB_MODEL_MEMORY_GB"
# a column's precision: a float dtype, or weight-only int8/int4 over float32 (gemma3_lab.analysis.compare)
PRECISIONS = tuple(COMPARE_PRECISIONS)


@dataclass(frozen=True)
class ModelKey:
    """One loaded variant: a bundled name or a resolved path, at one precision."""

    source: str
    precision: str = "float32"

    def __str__(self) -> str:
        return self.source if self.precision == "float32" else f"{self.source} ({self.precision})"


@dataclass
class Entry:
    model: object
    lock: threading.RLock = field(default_factory=threading.RLock)

    def lock_busy(self) -> bool:
        if self.lock.acquire(blocking=False):
            self.lock.release()
            return False
        return True


class ModelRegistry:
    """`resolve(choice)` checks a model choice; `get(ModelKey)` loads it once and returns its Entry.

    choice: a bundled name (`gemma-3-270m`, `demo-multimodal`) or a folder / .gguf file
    inside `root` (absolute, or relative to the root). Anything outside the root, through
    `..` or a symlink, is refused. With no root, only the bundled names are allowed.
    """

    def __init__(self, root: str | os.PathLike | None = None, loader=None, memory_bytes: int | None = None) -> None:
        if root is None:
            root = os.environ.get(ROOT_ENV) or None
        self.root = Path(root).expanduser().resolve() if root else None
        self._loader = loader
        self.memory_bytes = memory_bytes if memory_bytes is not None else _default_budget()
        self._entries: OrderedDict[ModelKey, Entry] = OrderedDict()  # least recently used first
        self._loading: dict[ModelKey, threading.Lock] = {}
        self._guard = threading.Lock()

    # ------------------------------------------------------------------ choices
    def choices(self) -> list[str]:
        """Bundled names, then every folder (with config.json) and .gguf file under the root."""
        found: list[str] = []
        if self.root is not None and self.root.is_dir():
            for p in sorted(self.root.iterdir()):
                if (p.is_dir() and (p / "config.json").exists()) or p.suffix == ".gguf":
                    found.append(str(p))
        return list(NAMES) + found

    def resolve(self, choice: str | None) -> str:
        """A cache key for `choice`, or ValueError saying why it is not allowed."""
        choice = (choice or "").strip() or BUNDLED
        if choice in NAMES:
            return choice
        if self.root is None:
            raise ValueError(
                f"model {choice!r}: local folders are disabled; set {ROOT_ENV} to a folder of "
                f"checkpoints to allow them (bundled: {', '.join(NAMES)})"
            )
        path = Path(choice).expanduser()
        path = (path if path.is_absolute() else self.root / path).resolve()
        if path != self.root and self.root not in path.parents:
            raise ValueError(f"model folder {choice!r} is outside the allowed root {self.root} ({ROOT_ENV})")
        if not path.exists():
            raise ValueError(f"model folder {choice!r}: no such folder or file under {self.root}")
        if path.is_dir() and not (path / "config.json").exists():
            raise ValueError(f"model folder {choice!r} has no config.json (a Hugging Face Gemma 3 folder is expected)")
        return str(path)

    # ------------------------------------------------------------------ loading
    def is_loaded(self, key: ModelKey) -> bool:
        return _key(key) in self._entries

    def get(self, key: ModelKey | str) -> Entry:
        """Load `key` (a resolved choice and a precision) once; concurrent callers wait for the same load."""
        key = _key(key)
        with self._guard:
            entry = self._entries.get(key)
            if entry is not None:
                self._entries.move_to_end(key)
                return entry
            lock = self._loading.setdefault(key, threading.Lock())
        with lock:
            entry = self._entries.get(key)
            if entry is None:
                model = self._load(key)
                model.requires_grad_(False)
                entry = Entry(model)
                with self._guard:
                    self._entries[key] = entry
                    self._evict(keep=key)
        return entry

    def loaded(self) -> list[ModelKey]:
        """The models held now, least recently used first."""
        with self._guard:
            return list(self._entries)

    def held_bytes(self) -> int:
        with self._guard:
            return sum(tensor_bytes(e.model) for e in self._entries.values())

    def _evict(self, keep: ModelKey) -> None:
        """Drop least recently used models that nobody is running until the rest fit the budget.
        A request holding an Entry keeps using it; the memory goes when that request ends."""
        sizes = {k: tensor_bytes(e.model) for k, e in self._entries.items()}
        total = sum(sizes.values())
        for k in list(self._entries):
            if total <= self.memory_bytes:
                break
            if k != keep and not self._entries[k].lock_busy():
                del self._entries[k]
                total -= sizes[k]

    def _load(self, key: ModelKey):
        if self._loader is not None:
            return self._loader(key)

        return load_precision(key.source, key.precision, progress=False)


def _default_budget() -> int:
    value = os.environ.get(MEMORY_ENV)
    if value:
        try:
            return int(float(value) * 2**30)
        except ValueError:
            raise ValueError(f"{MEMORY_ENV}={value!r}: expected a number of GB, such as 8") from None
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2
    except (ValueError, OSError, AttributeError):
        return 8 * 2**30


def _key(key: ModelKey | str) -> ModelKey:
    return key if isinstance(key, ModelKey) else ModelKey(key)
