"""What a look can take away and bring back, through `gradio_client`: a session file saved and
loaded into a fresh session gives the same page and the same inspector numbers without
generating again; Python reads the same file into the same results; every figure comes as a
PNG (the pixels shown) and an SVG, every table as a CSV that reads back to the numbers shown."""

from __future__ import annotations

import csv
import io

import numpy as np
import pytest
from PIL import Image
from test_app_api import Forwards, app, client, generate, model  # noqa: F401  (fixtures)

from gemma3_lab.analysis.session_file import load_session
from gemma3_lab.app.ui.capture_store import from_result

pytestmark = pytest.mark.real
STEER = {"b_intervention": "steer", "b_layer": 6, "b_steer_positive": "Love", "b_steer_negative": "Hate",
         "b_steer_scale": 8.0}


def reload(app, path):
    from gradio_client import Client, handle_file

    fresh = Client(app.url, verbose=False)
    return fresh, fresh.predict(handle_file(path), api_name="/load_session")


def test_a_saved_session_loads_back_into_the_same_page(app, client, model):
    out = generate(client, **STEER)
    client.predict(column="A", api_name="/logit_lens_all")  # A's lens table at every slot travels in the file
    before = [client.predict(column=c, index=1, layer=6, head=-1, api_name="/inspect") for c in "AB"]
    assert len(before[0][9]["positions"]) == out["A"]["prompt_tokens"] + len(out["A"]["token_ids"]) - 1
    path = client.predict(api_name="/save_session")
    with Forwards(model) as f:
        fresh, page = reload(app, path)
        after = [fresh.predict(column=c, index=1, layer=6, head=-1, api_name="/inspect") for c in "AB"]
    # the load's outputs: every generate field, then the statuses and strips, divergence, results
    from gemma3_lab.app.ui.events import GENERATE_PARAMS

    fields = dict(zip(GENERATE_PARAMS, page))
    assert fields["prompt"] == "The capital of France is" and fields["b_intervention"] == "steer"
    assert fields["b_steer_positive"] == "Love" and fields["b_steer_scale"] == 8.0
    assert page[-1] == out  # the results JSON, both columns
    assert "steering: 8" in page[len(GENERATE_PARAMS) + 2]  # B's status still names its intervention
    for b, a in zip(before, after):
        assert b[3] == a[3] and b[4] == a[4] and b[-1] == a[-1]  # header, candidates, the JSON
        assert b[8] == a[8] and b[9] == a[9]  # the attention view's and lens table's numbers
    assert f.n == 0  # loading and looking never ran the network (the lens reads the saved residuals)


def test_python_reads_the_apps_file_into_the_same_results(client, model):
    out = generate(client)
    saved = load_session(client.predict(api_name="/save_session"))
    a = saved.results["A"]
    assert a.token_ids == out["A"]["token_ids"] and a.text == out["A"]["text"]
    assert [round(s.prob, 6) for s in a.steps] == out["A"]["probs"]
    cap = from_result(a, model.config)
    T = len(a.prompt_ids) + len(a.token_ids) - 1
    assert cap.length == T and cap.resid.shape == (model.config.text.num_layers + 1, T, model.config.text.hidden_size)
    assert saved.settings["app"]["generate"]["a_model"] == out["A"]["model"]


def test_a_bad_session_file_is_one_message(app, client, tmp_path):
    bad = tmp_path / "not_a_session.zip"
    bad.write_bytes(b"PK\x03\x04 nope")
    with pytest.raises(Exception, match="not a session file"):
        reload(app, bad)
    with pytest.raises(Exception, match="nothing to save yet"):
        type(client)(app.url, verbose=False).predict(api_name="/save_session")


def test_figures_come_as_png_and_svg_and_tables_as_csv(client):
    generate(client)
    look = client.predict(column="A", index=2, layer=5, head=-1, api_name="/inspect")
    heatmap, mask, lens, files = client.predict(column="A", index=2, layer=5, head=-1, api_name="/inspect_figures")
    by_suffix = {}
    for f in files:
        by_suffix.setdefault(f.rsplit(".", 1)[1], []).append(f)
    assert len(by_suffix["png"]) == len(by_suffix["svg"]) == 3 and len(by_suffix["csv"]) == 4
    shown = {p: np.asarray(Image.open(p).convert("RGB")) for p in (heatmap, mask, lens)}
    for png in by_suffix["png"]:
        with open(png, "rb") as fh:
            assert fh.read(8) == b"\x89PNG\r\n\x1a\n"
        pixels = np.asarray(Image.open(png).convert("RGB"))
        assert any(s.shape == pixels.shape and (s == pixels).all() for s in shown.values()), png  # lossless
    for svg in by_suffix["svg"]:
        text = open(svg, encoding="utf-8").read()
        assert text.lstrip().startswith("<?xml") and "<text" in text  # labels stay text
    data = look[-1]
    tables = {f.rsplit("_", 1)[1]: list(csv.reader(io.StringIO(open(f, encoding="utf-8").read())))
              for f in by_suffix["csv"]}
    cand = tables["candidates.csv"]
    assert [[r[0], int(r[1]), float(r[2])] for r in cand[1:]] == [[p, i, q] for p, i, q in data["top_k"]]
    assert [[int(r[0]), r[1], float(r[2])] for r in tables["attended.csv"][1:]] == data["attended"]
    lens_rows = tables["lens.csv"][1:]
    assert [r[0] for r in lens_rows] == [row[0] for row in data["logit_lens"]]
    assert [float(r[2]) for r in lens_rows] == [row[2] for row in data["logit_lens"]]
    # every slot of the lens table (here the ones looked at): slot, token, then the same columns
    slots = tables["slots.csv"]
    assert slots[0][:3] == ["slot", "token", "after"]
    q = data["query_position"]
    mine = [r[2:] for r in slots[1:] if int(r[0]) == q]
    assert [[r[0], float(r[2])] for r in mine] == [[row[0], row[2]] for row in data["logit_lens"]]
