"""What one column asks for (model, decoding, pan-and-scan, intervention) and the shared
prompt, checked before anything runs so a bad setting comes back as one clear message."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from gemma3_lab.app.ui.checks import SettingsError, number
from gemma3_lab.prompt.images import load_image
from gemma3_lab.prompt.processor import START_OF_IMAGE

MAX_NEW_TOKENS = 512  # the app's cap per column, to keep one request from holding a model for long
DECODING = ("greedy", "sample")
LIMIT_ENV = "GEMMA3_LAB_MAX_PROMPT_TOKENS"
DEFAULT_PROMPT_TOKENS = 4096  # a prefill of this many tokens takes tens of seconds on a laptop CPU


@dataclass(frozen=True)
class Decoding:
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None
    max_new_tokens: int = 32

    def kwargs(self) -> dict:
        return {
            "do_sample": self.do_sample, "temperature": self.temperature, "top_k": self.top_k,
            "top_p": self.top_p, "seed": self.seed, "max_new_tokens": self.max_new_tokens,
        }

    def describe(self) -> str:
        if not self.do_sample:
            return f"greedy, {self.max_new_tokens} tokens max"
        parts = [f"T={self.temperature:g}"]
        if self.top_k:
            parts.append(f"top-k {self.top_k}")
        if self.top_p is not None:
            parts.append(f"top-p {self.top_p:g}")
        parts.append(f"seed {self.seed}" if self.seed is not None else "unseeded")
        return f"sampling ({', '.join(parts)}), {self.max_new_tokens} tokens max"


@dataclass(frozen=True)
class ColumnSpec:
    name: str  # "A" | "B"
    model: object  # the registry's ModelKey (resolved source, precision)
    decoding: Decoding
    pan_and_scan: bool = False
    intervention: object = None  # an InterventionSpec (ui.interventions), or None


def prompt_token_limit() -> int:
    """The longest prompt the app accepts (tokens): $GEMMA3_LAB_MAX_PROMPT_TOKENS, else 4096."""
    value = os.environ.get(LIMIT_ENV)
    if not value:
        return DEFAULT_PROMPT_TOKENS
    return number(LIMIT_ENV, value, int, lo=1)


def parse_decoding(col: str, mode, temperature, top_k, top_p, seed, max_new_tokens) -> Decoding:
    """Checked decoding settings; top-k 0 and top-p 1 mean "off", an empty seed "unseeded"."""
    if mode not in DECODING:
        raise SettingsError(f"column {col}: decoding must be one of {', '.join(DECODING)}, not {mode!r}")
    n = number(f"column {col}: max new tokens", max_new_tokens, int, lo=1, hi=MAX_NEW_TOKENS)
    if mode == "greedy":
        return Decoding(max_new_tokens=n)
    t = number(f"column {col}: temperature", temperature, lo=0, lo_open=True, hi=100)
    k = number(f"column {col}: top-k", top_k, int, lo=0, allow_none=True)
    p = number(f"column {col}: top-p", top_p, lo=0, lo_open=True, hi=1, allow_none=True)
    s = number(f"column {col}: seed", seed, int, lo=0, hi=2**63 - 1, allow_none=True)
    return Decoding(True, t, k or None, None if p in (None, 1.0) else p, s, n)


def uploaded_images(files) -> list:
    """PIL images from the uploaded files; a file that is not an image is named in the error."""
    images = []
    for f in files or []:
        path = f if isinstance(f, (str, os.PathLike)) else getattr(f, "name", None) or f.get("path")
        name = Path(path).name
        try:
            images.append(load_image(path, name=name))
        except (ValueError, OSError) as e:
            raise SettingsError(f"upload {name!r} is not an image we can read ({e})") from None
    return images


def build_prompt(text: str | None, chat: bool, n_images: int):
    """The prompt the library gets: plain text (one `<start_of_image>` per image put first
    when the text has none) or a one-turn user chat with the images before the text."""
    text = text or ""
    if not text.strip() and not n_images:
        raise SettingsError("the prompt is empty: type something to generate from")
    if chat:
        content = [{"type": "image"} for _ in range(n_images)] + [{"type": "text", "text": text}]
        return [{"role": "user", "content": content if n_images else text}]
    if n_images and START_OF_IMAGE not in text:
        text = START_OF_IMAGE * n_images + text
    return text
