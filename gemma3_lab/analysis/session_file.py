"""A session on disk: the prompt, the settings, every column's generation (step records, inputs,
captures) and the captured arrays, as one .zip holding a JSON record and an .npz of arrays, so
a view can be reproduced later, in the app or in Python (`load_session`).

Nothing is unpickled: arrays come back through `np.load(allow_pickle=False)`, and a file that
is not what `save_session` writes is refused with one line naming the file and the member.
"""

from __future__ import annotations

import importlib.metadata
import io
import json
import zipfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from gemma3_lab.errors import Gemma3LabError
from gemma3_lab.generate import GenerationResult, Step
from gemma3_lab.instrument.capture import Capture
from gemma3_lab.model.banded import BandedPattern
from gemma3_lab.prompt.inputs import ImageSpan, Inputs

FORMAT = "gemma3_lab.session/1"
RECORD = "session.json"
ARRAYS = "arrays.npz"
MAX_RECORD_BYTES = 256 * 2**20  # a record larger than this is not one we wrote
MAX_ARRAY_BYTES = 16 * 2**30


@dataclass
class Session:
    prompt: object  # the text, or chat messages, as given
    settings: dict
    results: dict[str, GenerationResult]  # column name -> its generation
    arrays: dict[str, object] = field(default_factory=dict)  # name -> np.ndarray or torch.Tensor, as saved
    versions: dict[str, str] = field(default_factory=dict)  # of the libraries that wrote the file


class _Arrays:
    """The npz side of the file: each array stored under a plain key, described in the record."""

    def __init__(self) -> None:
        self.store: dict[str, np.ndarray] = {}

    def put(self, x) -> dict:
        key = f"a{len(self.store)}"
        if isinstance(x, torch.Tensor):
            t = x.detach().cpu()
            # numpy has no bfloat16: its bits travel as int16
            arr = t.view(torch.int16).numpy() if t.dtype == torch.bfloat16 else t.numpy()
            self.store[key] = arr.copy()
            return {"key": key, "kind": "torch", "dtype": str(t.dtype).removeprefix("torch.")}
        arr = np.asarray(x)
        if arr.dtype.hasobject:
            raise Gemma3LabError(f"an array of Python objects cannot be saved (dtype {arr.dtype})")
        self.store[key] = arr
        return {"key": key, "kind": "numpy", "dtype": str(arr.dtype)}


def _pattern(x, arrays: _Arrays) -> dict:
    if isinstance(x, BandedPattern):
        return {"type": "band", "band": arrays.put(x.band), "q_slots": arrays.put(x.q_slots), "back": x.back,
                "kv_start": x.kv_start, "kv_len": x.kv_len, "fill": x.fill}
    return {"type": "tensor", "array": arrays.put(x)}


def _inputs(x: Inputs, arrays: _Arrays) -> dict:
    return {"input_ids": arrays.put(x.input_ids), "attention_mask": arrays.put(x.attention_mask),
            "token_types": arrays.put(x.token_types),
            "pixel_values": None if x.pixel_values is None else arrays.put(x.pixel_values),
            "image_spans": [asdict(s) for s in x.image_spans],
            "images": [{"mode": im.mode, "pixels": arrays.put(np.asarray(im))} for im in x.images]}


def _result(r: GenerationResult, arrays: _Arrays) -> dict:
    return {"text": r.text, "token_ids": r.token_ids, "steps": [asdict(s) for s in r.steps],
            "prompt_ids": r.prompt_ids, "stop_reason": r.stop_reason,
            "inputs": None if r.inputs is None else _inputs(r.inputs, arrays),
            "prefill_seconds": r.prefill_seconds, "decode_seconds": r.decode_seconds,
            "decode_paths": r.decode_paths,
            "captures": {name: {"positions": arrays.put(c.positions), "tensor": _pattern(c.tensor(), arrays)}
                         for name, c in r.captures.items()}}


def versions() -> dict[str, str]:
    try:
        ours = importlib.metadata.version("gemma3_lab")
    except importlib.metadata.PackageNotFoundError:
        ours = "unknown"
    return {"format": FORMAT, "gemma3_lab": ours, "torch": torch.__version__, "numpy": np.__version__}


def _json_or_raise(what: str, value) -> None:
    try:
        json.dumps(value, allow_nan=True)
    except (TypeError, ValueError) as e:
        raise Gemma3LabError(f"{what} cannot be saved as JSON: {e}") from None


def save_session(path, prompt, settings: dict, results: dict[str, GenerationResult], arrays: dict | None = None) -> Path:
    """Write the session to `path` (a .zip: session.json and arrays.npz); returns the path.

    Each result's captures are kept as their stitched `.tensor()` (a `BandedPattern` for local
    layers' patterns, else a plain tensor) with their `.positions`, and come back as one-piece
    `Capture`s giving the same `.tensor()` and `capture[pos]`; images as their pixels and mode.
    """
    _json_or_raise("the prompt", prompt)
    for k, v in settings.items():
        _json_or_raise(f"setting {k!r}", v)
    store = _Arrays()
    record = {"versions": versions(), "prompt": prompt, "settings": settings,
              "results": {str(name): _result(r, store) for name, r in results.items()},
              "arrays": {str(name): store.put(a) for name, a in (arrays or {}).items()}}
    buf = io.BytesIO()
    np.savez(buf, **store.store)
    path = Path(path)
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(RECORD, json.dumps(record, ensure_ascii=False), compress_type=zipfile.ZIP_DEFLATED)
        zf.writestr(ARRAYS, buf.getvalue(), compress_type=zipfile.ZIP_STORED)
    return path


class _Reader:
    """Arrays of an opened npz by their record description, each failure named."""

    def __init__(self, npz, where: str) -> None:
        self.npz, self.where = npz, where

    def get(self, d: dict):
        key = d["key"]
        if key not in self.npz.files:
            raise Gemma3LabError(f"{self.where}: the record names array {key!r}, which is not in it")
        try:
            arr = self.npz[key]
        except ValueError as e:  # an object array: refused without unpickling
            raise Gemma3LabError(f"{self.where}: array {key!r}: {e}") from None
        if d["kind"] == "numpy":
            if str(arr.dtype) != d["dtype"]:
                raise Gemma3LabError(f"{self.where}: array {key!r} is {arr.dtype}, the record says {d['dtype']}")
            return arr
        t = torch.from_numpy(arr.copy())
        dtype = getattr(torch, d["dtype"], None)
        if not isinstance(dtype, torch.dtype):
            raise Gemma3LabError(f"{self.where}: array {key!r} has an unknown dtype {d['dtype']!r}")
        return t.view(torch.bfloat16) if dtype == torch.bfloat16 else t.to(dtype)


def _load_pattern(d: dict, rd: _Reader):
    if d["type"] == "band":
        return BandedPattern(rd.get(d["band"]), rd.get(d["q_slots"]), int(d["back"]), int(d["kv_start"]),
                             int(d["kv_len"]), float(d["fill"]))
    if d["type"] == "tensor":
        return rd.get(d["array"])
    raise Gemma3LabError(f"{rd.where}: unknown capture type {d['type']!r}")


def _load_capture(name: str, d: dict, rd: _Reader) -> Capture:
    cap = Capture(name)
    cap.pieces, cap.slots = [_load_pattern(d["tensor"], rd)], [rd.get(d["positions"])]
    return cap


def _load_inputs(d: dict | None, rd: _Reader) -> Inputs | None:
    if d is None:
        return None
    return Inputs(rd.get(d["input_ids"]), rd.get(d["attention_mask"]), rd.get(d["token_types"]),
                  None if d["pixel_values"] is None else rd.get(d["pixel_values"]),
                  [ImageSpan(**{**s, "box": tuple(s["box"]) if s["box"] is not None else None})
                   for s in d["image_spans"]],
                  [Image.fromarray(rd.get(im["pixels"]), mode=im["mode"]) for im in d["images"]])


def _load_result(d: dict, rd: _Reader) -> GenerationResult:
    steps = [Step(**{**s, "top_k": [tuple(p) for p in s["top_k"]]}) for s in d["steps"]]
    return GenerationResult(
        text=d["text"], token_ids=list(d["token_ids"]), steps=steps, prompt_ids=list(d["prompt_ids"]),
        stop_reason=d["stop_reason"], inputs=_load_inputs(d["inputs"], rd),
        prefill_seconds=float(d["prefill_seconds"]), decode_seconds=float(d["decode_seconds"]),
        decode_paths={str(k): int(n) for k, n in d.get("decode_paths", {}).items()},  # absent before 2026-12-04
        captures={name: _load_capture(name, c, rd) for name, c in d["captures"].items()})


def _member(zf: zipfile.ZipFile, name: str, limit: int, where: str) -> bytes:
    try:
        info = zf.getinfo(name)
    except KeyError:
        raise Gemma3LabError(f"{where}: no member {name} (a session file holds {RECORD} and {ARRAYS})") from None
    if info.file_size > limit:
        raise Gemma3LabError(f"{where}: member {name} is {info.file_size:,} bytes, over the {limit:,} a session holds")
    try:
        return zf.read(name)
    except (zipfile.BadZipFile, OSError, EOFError, NotImplementedError) as e:
        raise Gemma3LabError(f"{where}: member {name} cannot be read: {e}") from None


def load_session(path) -> Session:
    """Read a file written by `save_session` back into the same objects."""
    path = Path(path)
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as e:
        raise Gemma3LabError(f"{path}: not a session file ({e})") from None
    with zf:
        raw = _member(zf, RECORD, MAX_RECORD_BYTES, str(path))
        try:
            record = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise Gemma3LabError(f"{path}: member {RECORD} is not JSON ({e})") from None
        if not isinstance(record, dict) or record.get("versions", {}).get("format") != FORMAT:
            found = record.get("versions", {}).get("format") if isinstance(record, dict) else None
            raise Gemma3LabError(f"{path}: member {RECORD} is not a {FORMAT} record (format {found!r})")
        data = _member(zf, ARRAYS, MAX_ARRAY_BYTES, str(path))
    try:
        npz = np.load(io.BytesIO(data), allow_pickle=False)
    except (ValueError, OSError, zipfile.BadZipFile, EOFError) as e:
        raise Gemma3LabError(f"{path}: member {ARRAYS} is not an .npz of arrays ({e})") from None
    rd = _Reader(npz, f"{path}: member {ARRAYS}")
    try:
        return Session(prompt=record["prompt"], settings=dict(record["settings"]),
                       results={k: _load_result(r, rd) for k, r in record["results"].items()},
                       arrays={k: rd.get(a) for k, a in record["arrays"].items()}, versions=dict(record["versions"]))
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        if isinstance(e, Gemma3LabError):
            raise
        raise Gemma3LabError(f"{path}: member {RECORD}: a field is missing or malformed ({type(e).__name__}: {e})") from None
