"""The app's one home for reading what a user typed: numbers (`number`, `whole`, `whole_list`)
and layer / head indices checked against the model that will use them. Every field of every
tab goes through these, so a message reads the same wherever the mistake was made."""

from __future__ import annotations

import math

from gemma3_lab.errors import Gemma3LabError

ALL_HEADS = -1  # a head choice meaning "every head of the layer" (their mean)
# how long an error message stays on the page (gr.Error's duration): long enough to read one
# line, finite so messages close by themselves instead of piling up
TOAST_SECONDS = 8.0


class SettingsError(Gemma3LabError):
    """A setting the user can fix; shown in the page as it is."""


def number(what: str, value, kind=float, *, lo=None, hi=None, lo_open=False, allow_none=False):
    """`value` as a checked number (`kind` int: a whole one); `what` names the field in the message."""
    if value is None or (isinstance(value, str) and not value.strip()):
        if allow_none:
            return None
        raise SettingsError(f"{what}: a value is needed")
    try:
        x = float(value)
    except (TypeError, ValueError):
        raise SettingsError(f"{what}: {value!r} is not a number") from None
    if not math.isfinite(x):
        raise SettingsError(f"{what}: {value!r} is not a finite number")
    if kind is int:
        if x != int(x):
            raise SettingsError(f"{what}: {value!r} must be a whole number")
        x = int(x)
    if lo is not None and (x <= lo if lo_open else x < lo):
        raise SettingsError(f"{what}: {value!r} must be {'>' if lo_open else '≥'} {lo}")
    if hi is not None and x > hi:
        raise SettingsError(f"{what}: {value!r} must be ≤ {hi}")
    return x


def whole(what: str, value) -> int:
    """A whole number (an index, a position): 3, 3.0 and "3" read the same."""
    return number(what, value, int)


def whole_list(what: str, text) -> list[int] | None:
    """"0, 2 3" -> [0, 2, 3]; empty -> None."""
    parts = ("" if text is None else str(text)).replace(",", " ").split()
    if not parts:
        return None
    try:
        return [number(what, p, int) for p in parts]
    except SettingsError:
        raise SettingsError(f"{what}: {text!r} is not a list of whole numbers (e.g. 0, 2)") from None


def check_layer(config, layer) -> int:
    """`layer` as an index of one of `config`'s decoder layers."""
    n = config.text.num_layers
    layer = whole("layer", layer)
    if not 0 <= layer < n:
        raise SettingsError(f"layer {layer} does not exist: {config.name} has layers 0–{n - 1}")
    return layer


def check_head(config, head, allow_all: bool = False) -> int:
    """`head` as an index of one of `config`'s query heads (ALL_HEADS too when `allow_all`)."""
    n = config.text.num_heads
    head = whole("head", ALL_HEADS if head is None and allow_all else head)
    if not (0 <= head < n or (allow_all and head == ALL_HEADS)):
        raise SettingsError(f"head {head} does not exist: {config.name}'s layers have heads 0–{n - 1}")
    return head
