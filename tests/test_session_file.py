"""Session files (gemma3_lab/analysis/session_file.py): two generations of a tiny random model,
with step records, inputs, an image, captures (bands and plain tensors) and extra arrays of
several dtypes, saved and loaded back field for field and bit for bit; a bad or hostile file is
one clear line naming the file and the member, and nothing is unpickled."""

from __future__ import annotations

import dataclasses
import io
import json
import zipfile

import numpy as np
import pytest
import torch
from PIL import Image
from test_attention_view import tiny_model

from gemma3_lab.analysis import session_file
from gemma3_lab.analysis.session_file import load_session, save_session
from gemma3_lab.errors import Gemma3LabError
from gemma3_lab.model.banded import BandedPattern, PatternView
from gemma3_lab.prompt.inputs import ImageSpan

CAPTURE = ["blocks.*.attn.hook_pattern", "blocks.1.hook_resid_post"]


@pytest.fixture(scope="module")
def results():
    model = tiny_model()
    prompt = torch.arange(2, 10)[None]
    a = model.generate(prompt, max_new_tokens=5, capture=CAPTURE)
    b = model.generate(prompt, max_new_tokens=4, do_sample=True, temperature=0.8, top_k=20, seed=7)
    picture = Image.fromarray(np.arange(4 * 5 * 3, dtype=np.uint8).reshape(4, 5, 3), mode="RGB")
    span = ImageSpan(batch=0, image=0, crop=0, start=2, end=4, grid=2, box=(0, 0, 5, 4))
    b.inputs = dataclasses.replace(b.inputs, pixel_values=torch.randn(1, 3, 8, 8), image_spans=[span],
                                   images=[picture])
    return {"A": a, "B": b}


ARRAYS = {
    "resid": torch.randn(3, 5, dtype=torch.bfloat16),
    "pattern16": np.random.default_rng(0).random((2, 4, 4)).astype(np.float16),
    "mask": torch.tensor([[True, False], [False, True]]),
    "ids": np.arange(6, dtype=np.int64),
}
SETTINGS = {"A": {"model": "tiny", "max_new_tokens": 5}, "B": {"do_sample": True, "temperature": 0.8, "seed": 7}}


def same_array(x, y) -> bool:
    if isinstance(x, torch.Tensor):
        return isinstance(y, torch.Tensor) and x.dtype == y.dtype and x.shape == y.shape and torch.equal(x, y)
    return isinstance(y, np.ndarray) and x.dtype == y.dtype and np.array_equal(x, y)


def same_pattern(x, y) -> bool:
    if isinstance(x, PatternView):
        plain = {f.name: getattr(x, f.name) for f in dataclasses.fields(x)}
        return type(x) is type(y) and all(
            same_array(v, getattr(y, k)) if isinstance(v, torch.Tensor)
            else all(map(same_array, v, getattr(y, k))) if isinstance(v, list) else v == getattr(y, k)
            for k, v in plain.items())
    return same_array(x, y)


def assert_same_result(a, b) -> None:
    for f in dataclasses.fields(a):
        if f.name not in ("inputs", "captures"):
            assert getattr(a, f.name) == getattr(b, f.name), f.name
    assert all(isinstance(t, tuple) for s in b.steps for t in s.top_k)
    for f in dataclasses.fields(a.inputs):
        x, y = getattr(a.inputs, f.name), getattr(b.inputs, f.name)
        if f.name == "images":
            assert [(i.mode, i.size, i.tobytes()) for i in x] == [(i.mode, i.size, i.tobytes()) for i in y]
        elif isinstance(x, torch.Tensor):
            assert same_array(x, y), f.name
        else:
            assert x == y, f.name
    assert a.captures.keys() == b.captures.keys()
    for name, cap in a.captures.items():
        assert same_array(cap.positions, b.captures[name].positions)
        assert same_pattern(cap.tensor(), b.captures[name].tensor()), name
        assert torch.equal(cap[3], b.captures[name][3])  # read by position as before


def test_a_session_round_trips_exactly(results, tmp_path):
    kinds = {type(c.tensor()) for c in results["A"].captures.values()}
    assert {BandedPattern, torch.Tensor} <= kinds  # local layers are bands, the residual a tensor
    path = save_session(tmp_path / "s.zip", "The prompt", SETTINGS, results, ARRAYS)
    with zipfile.ZipFile(path) as zf:
        assert sorted(zf.namelist()) == ["arrays.npz", "session.json"]
    s = load_session(path)
    assert s.prompt == "The prompt" and s.settings == SETTINGS
    assert s.versions["format"] == "gemma3_lab.session/1" and s.versions["torch"] == torch.__version__
    assert s.results.keys() == results.keys()
    for k in results:
        assert_same_result(results[k], s.results[k])
    assert s.arrays.keys() == ARRAYS.keys()
    for k, v in ARRAYS.items():
        assert same_array(v, s.arrays[k]), k


def test_settings_that_are_not_json_are_named(results, tmp_path):
    with pytest.raises(Gemma3LabError, match="setting 'model' cannot be saved as JSON"):
        save_session(tmp_path / "x.zip", "p", {"model": object()}, results)
    with pytest.raises(Gemma3LabError, match="array of Python objects"):
        save_session(tmp_path / "x.zip", "p", {}, results, {"bad": np.array([{}], dtype=object)})


def rewrite(src, dst, **members) -> None:
    """A copy of session zip `src` with some members replaced (None: dropped)."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for name in zin.namelist():
            if name not in members:
                zout.writestr(name, zin.read(name))
        for name, data in members.items():
            if data is not None:
                zout.writestr(name, data)


def object_npz() -> bytes:
    buf = io.BytesIO()
    np.savez(buf, a0=np.array([{"x": 1}], dtype=object))  # np.savez pickles object arrays
    return buf.getvalue()


@pytest.mark.parametrize("case, message", [
    ("not a zip", r"not a session file"),
    ("no record", r"no member session.json"),
    ("no arrays", r"no member arrays.npz"),
    ("record not JSON", r"member session.json is not JSON"),
    ("other format", r"member session.json is not a gemma3_lab.session/1 record \(format 'other/2'\)"),
    ("field missing", r"member session.json: a field is missing or malformed \(KeyError: 'results'\)"),
    ("pickled array", r"member arrays.npz: array 'a0': .*allow_pickle"),
    ("array missing", r"member arrays.npz: the record names array 'a0', which is not in it"),
    ("arrays not npz", r"member arrays.npz is not an .npz of arrays"),
    ("huge record", r"member session.json is .* bytes, over the 10"),
])
def test_a_bad_file_is_one_clear_line(results, tmp_path, monkeypatch, case, message):
    good = save_session(tmp_path / "good.zip", "p", {}, {"A": results["A"]}, {"x": np.zeros(2)})
    bad = tmp_path / "bad.zip"
    record = json.loads(zipfile.ZipFile(good).read("session.json"))
    if case == "not a zip":
        bad.write_text("hello")
    elif case == "no record":
        rewrite(good, bad, **{"session.json": None})
    elif case == "no arrays":
        rewrite(good, bad, **{"arrays.npz": None})
    elif case == "record not JSON":
        rewrite(good, bad, **{"session.json": b"{\xff"})
    elif case == "other format":
        rewrite(good, bad, **{"session.json": json.dumps({"versions": {"format": "other/2"}})})
    elif case == "field missing":
        del record["results"]
        rewrite(good, bad, **{"session.json": json.dumps(record)})
    elif case == "pickled array":
        rewrite(good, bad, **{"arrays.npz": object_npz()})
    elif case == "array missing":
        buf = io.BytesIO()
        np.savez(buf, zz=np.zeros(1))
        rewrite(good, bad, **{"arrays.npz": buf.getvalue()})
    elif case == "arrays not npz":
        rewrite(good, bad, **{"arrays.npz": b"not an npz"})
    elif case == "huge record":
        monkeypatch.setattr(session_file, "MAX_RECORD_BYTES", 10)
        bad = good
    with pytest.raises(Gemma3LabError, match=message) as err:
        load_session(bad)
    assert str(bad) in str(err.value) and "\n" not in str(err.value)
