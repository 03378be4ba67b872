"""The project's own error type. Every bad input a user can give (a file, a field, a value) is
raised as a `Gemma3LabError` with one line that names it; the CLI prints it as `error: ...` and
exits 2, the app shows it as a message. It is a ValueError, so older `except ValueError` code and
tests keep working."""

import math
from typing import Mapping


class Gemma3LabError(ValueError):
    """A bad input, named in one line."""


def number(name: str, value, *, integer: bool = False, low: float | None = None, high: float | None = None,
           above: float | None = None):
    """`value` as a finite int (integer=True; 3.0 counts) or float, within [low, high] and > above,
    else a Gemma3LabError naming `name`. null, text, true, NaN and inf are refused."""
    v = value
    if integer and isinstance(v, float) and v.is_integer():
        v = int(v)
    ok = not isinstance(v, bool) and isinstance(v, int if integer else (int, float))
    if not ok or (not integer and not math.isfinite(v)):
        raise Gemma3LabError(f"{name} = {value!r} must be {'an integer' if integer else 'a finite number'}")
    if (low is not None and v < low) or (high is not None and v > high) or (above is not None and v <= above):
        bounds = [f">= {low:,}" if low is not None else "", f"> {above:,}" if above is not None else "",
                  f"<= {high:,}" if high is not None else ""]
        raise Gemma3LabError(f"{name} = {value!r} must be {' and '.join(b for b in bounds if b)}")
    return v if integer else float(v)


def mapping(value, name: str) -> Mapping:
    """`value` if it is a JSON object (a Mapping), else a Gemma3LabError naming `name`."""
    if not isinstance(value, Mapping):
        raise Gemma3LabError(f"{name} must be a JSON object, got {type(value).__name__}")
    return value
