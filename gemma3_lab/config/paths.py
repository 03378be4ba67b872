"""Where gemma3_lab keeps what it makes once and reuses (converted GGUF folders, built kernels)."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    """$GEMMA3_LAB_CACHE, else ~/.cache/gemma3_lab."""
    return Path(os.environ.get("GEMMA3_LAB_CACHE") or Path.home() / ".cache" / "gemma3_lab")
