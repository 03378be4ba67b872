"""Shared pieces of the visualizers: token labels, dense patterns, the model/config/tokenizer a
visual is drawn for, and matplotlib helpers (tick thinning, the untrained-vision label)."""

from __future__ import annotations

import functools
import os
import re
from dataclasses import dataclass

from torch import Tensor

from gemma3_lab.config import BUNDLED, PRESETS, Gemma3Config
from gemma3_lab.load import bundled_gguf_path, source_kind
from gemma3_lab.loading.demo import demo_config
from gemma3_lab.loading.gguf import read_gguf_config
from gemma3_lab.loading.gguf_convert import cached_conversion
from gemma3_lab.loading.gguf_tokenizer import tokenizer_from_gguf
from gemma3_lab.prompt.tokenizer import Tokenizer

LABEL_WIDTH = 14  # longest token label drawn in full; longer ones end in "…"
MAX_TICKS = 64  # more tick labels than this overlap at any readable font size


def dense(pattern) -> Tensor:
    """A plain tensor from a cached pattern: banded views (hooks' `BandedPattern`) expand themselves."""
    return pattern.dense() if hasattr(pattern, "dense") else pattern


def shorten(label: str, width: int = LABEL_WIDTH) -> str:
    return label if len(label) <= width else label[: width - 1] + "…"


@functools.lru_cache(maxsize=1)
def _font_chars() -> frozenset[int]:
    import matplotlib
    from matplotlib import font_manager, ft2font

    path = font_manager.findfont(font_manager.FontProperties(family=matplotlib.rcParams["font.family"]))
    return frozenset(ft2font.FT2Font(path).get_charmap())


def fig_label(label: str, width: int = LABEL_WIDTH) -> str:
    """A label matplotlib can draw: characters the font lacks (CJK with DejaVu) written as
    U+XXXX rather than empty boxes, then shortened."""
    chars = _font_chars()
    label = "".join(c if ord(c) in chars or c.isspace() else f"U+{ord(c):04X}" for c in label)
    # a run such as twelve "▁" (a Gemma whitespace token) reads better counted than drawn
    label = re.sub(r"(.)\1{3,}", lambda m: f"{m.group(1)}×{len(m.group(0))}", label)
    # an escaped "$" is drawn as itself: a token such as "$$\\" would otherwise start math text
    return shorten(label, width).replace("$", r"\$")


def printable(piece: str) -> str:
    """A token piece on one line: newlines and tabs written as escapes, "▁" kept (Gemma's space)."""
    return piece.replace("\n", "\\n").replace("\t", "\\t").replace("\r", "\\r")


def token_labels(tokenizer, ids, config: Gemma3Config, spans=(), batch: int = 0) -> list[str]:
    """One label per slot of row `batch`: the tokenizer's piece, and for image soft tokens
    "imgI·t" (crop c: "imgI.c·t"), the t-th of the 256 tokens of image I — a text-only
    tokenizer has no piece for the soft-token id, the processor still expands it."""
    ids = ids[batch].tolist() if isinstance(ids, Tensor) and ids.dim() == 2 else list(map(int, ids))
    out = []
    for i in ids:
        piece = tokenizer.id_to_token(i) if tokenizer is not None else None
        out.append(printable(piece) if piece is not None else f"<{i}>")
    for s in spans:
        if s.batch != batch:
            continue
        name = f"img{s.image}" if s.crop == 0 else f"img{s.image}.{s.crop}"
        for slot in range(s.start, s.end):
            out[slot] = f"{name}·{slot - s.start}"
    for slot, i in enumerate(ids):  # soft tokens outside any recorded span (Inputs built by hand)
        if i == config.image_token_id and not out[slot].startswith("img"):
            out[slot] = "<image_soft_token>"
    return out


# --------------------------------------------------------------------------- what is drawn
@dataclass
class Source:
    """What a mask picture needs: the config (layer types, windows, image geometry) and a tokenizer."""

    config: Gemma3Config
    tokenizer: object
    name: str


@functools.lru_cache(maxsize=1)
def bundled_tokenizer():
    """The bundled 270M's tokenizer (Gemma 3 shares one vocabulary across sizes), read once."""
    return Tokenizer.from_file(cached_conversion(bundled_gguf_path(), progress=False))


def resolve_source(what, tokenizer=None) -> Source:
    """A loaded model, a `Gemma3Config`, a preset name ("gemma-3-270m", "gemma-3-4b",
    "demo-multimodal"), an HF folder (config.json [+ tokenizer.json]) or a .gguf file —
    read without loading weights, since masks depend only on the config."""
    if hasattr(what, "config") and hasattr(what, "tokenizer"):  # a loaded Gemma3
        return Source(what.config, tokenizer or what.tokenizer, what.config.name)
    if isinstance(what, Gemma3Config):
        return Source(what, tokenizer or bundled_tokenizer(), what.name)
    if str(what) in PRESETS:
        return Source(PRESETS[str(what)], tokenizer or bundled_tokenizer(), str(what))
    try:
        kind, path = source_kind(what)
    except FileNotFoundError:
        raise FileNotFoundError(f"{what!r} is not a model, a config, a preset ({', '.join(PRESETS)}, demo-multimodal), "
                                "a folder with config.json, or a .gguf file") from None
    if kind in ("bundled", "demo"):
        cfg = PRESETS[BUNDLED] if kind == "bundled" else demo_config(PRESETS[BUNDLED])
        return Source(cfg, tokenizer or bundled_tokenizer(), cfg.name)
    if kind == "folder":
        cfg = Gemma3Config.from_json(path / "config.json")
        if tokenizer is None:
            tj = path / "tokenizer.json"
            tokenizer = Tokenizer.from_file(tj) if tj.is_file() else bundled_tokenizer()
        return Source(cfg, tokenizer, path.name)
    return Source(read_gguf_config(path), tokenizer or tokenizer_from_gguf(path), path.stem)


# --------------------------------------------------------------------------- matplotlib
def use_color(color: bool | None, stream) -> bool:
    """Colour when asked, else only on a terminal and never when NO_COLOR is set (no-color.org)."""
    if color is not None:
        return color
    if os.environ.get("NO_COLOR"):
        return False
    return bool(getattr(stream, "isatty", lambda: False)())


def tick_positions(n: int, spans=(), max_ticks: int = MAX_TICKS) -> list[int]:
    """Slots to label: every one when they fit; else, keeping labels apart by n / max_ticks
    slots, first the ends and each image's boundaries and quarter marks, then text tokens."""
    if n <= max_ticks:
        return list(range(n))
    soft = {i for s in spans for i in range(s.start, s.end)}
    first = [0, n - 1] + [i for s in spans for i in (s.start - 1, s.start, *range(s.start + 64, s.end, 64),
                                                           s.end - 1, s.end) if 0 <= i < n]
    rest = [i for i in range(n) if i not in soft]
    gap = 0.9 * n / max_ticks
    kept: list[int] = []
    for i in first + rest:  # greedy by priority: a later candidate too close to a kept one is dropped
        if all(abs(i - k) >= gap for k in kept):
            kept.append(i)
    return sorted(kept)


def set_token_ticks(ax, labels: list[str], axis: str = "both", spans=(), max_ticks: int = MAX_TICKS) -> None:
    """Token labels as tick labels (see `tick_positions` for long prompts); the other axis,
    if any, gets no ticks."""
    pos = tick_positions(len(labels), spans, max_ticks)
    # when only some slots are labelled, the slot number says where each one is
    text = [fig_label(labels[p]) if len(pos) == len(labels) else f"{p} {fig_label(labels[p])}" for p in pos]
    if axis in ("x", "both"):
        ax.set_xticks(pos, text, rotation=90, fontsize=_tick_size(len(pos)))
    else:
        ax.set_xticks([])
    if axis in ("y", "both"):
        ax.set_yticks(pos, text, fontsize=_tick_size(len(pos)))
    else:
        ax.set_yticks([])


def _tick_size(n: int) -> float:
    return 9 if n <= 24 else 7 if n <= 48 else 5.5


def model_note(config: Gemma3Config) -> str:
    """The config's notes (e.g. "untrained vision: ..."), shown on every figure of that model."""
    return " · ".join(config.notes)


def label_figure(fig, config: Gemma3Config | None, images: bool = False) -> None:
    """Put the model's name and notes at the foot of the figure; image figures must say when
    the vision tower is untrained, so the note is drawn in red there."""
    if config is None:
        return
    note = model_note(config)
    text = config.name + (f" · {note}" if note else "")
    eng = fig.get_layout_engine()
    if eng is not None and "rect" in eng.get():  # keep the axes clear of the foot line
        left, bottom, width, height = eng.get()["rect"]
        if bottom < 0.04:
            eng.set(rect=(left, 0.04, width, height - (0.04 - bottom)))
    fig.text(0.01, 0.005, text, fontsize=7 if not images else 8, color="#b00020" if note and images else "#555555",
             ha="left", va="bottom", wrap=True)
