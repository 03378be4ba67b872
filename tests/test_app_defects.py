"""Defects a user met in the page, pinned through the handlers and `gradio_client`: intervention
fields left over from another kind, error messages that never closed, a column left saying
"loading…" after the other column's error, and Python advice in a page's message."""

from __future__ import annotations

import ast
import html
import math
from pathlib import Path

import gradio as gr
import pytest
from PIL import Image

pytest.importorskip("gradio_client")
from gradio_client import Client, handle_file  # noqa: E402

from gemma3_lab.app.ui.checks import TOAST_SECONDS, SettingsError  # noqa: E402
from gemma3_lab.app.ui.intervene import parse_intervention  # noqa: E402
from gemma3_lab.load import BUNDLED  # noqa: E402

APP = Path(__file__).parents[1] / "gemma3_lab" / "app"


def text_only(col: str) -> str:
    """The app's message, written out: what to do in the page, for that column."""
    return (f"column {col}: gemma-3-270m is a text-only model and cannot read the uploaded image(s): choose "
            f"\"demo-multimodal\" in column {col}'s model box, or remove the images")


def fields(**changes) -> dict:
    """One column's intervention fields as the page sends them after the user tried every kind."""
    base = {"intervention": "none", "layer": 5, "heads": "0, 2", "steer_positive": "Love", "steer_negative": "",
            "steer_scale": 4.0, "patch_site": "resid_post", "patch_positions": "one, two"}
    return {**base, **changes}


# ------------------------------------------------------------------ 1. leftover intervention fields
def test_patch_ignores_heads_left_from_an_ablation():
    spec = parse_intervention("B", fields(intervention="patch from other column", patch_positions=""))
    assert (spec.kind, spec.site, spec.heads, spec.positions) == ("patch from other column", "resid_post", None, None)
    assert "heads" not in spec.describe()


def test_each_kind_reads_only_its_own_fields():
    # leftovers that do not parse (heads "x", positions "one, two", an empty steer text) belong to other kinds
    ablate = parse_intervention("A", fields(intervention="ablate heads", heads="1 3"))
    assert (ablate.heads, ablate.positive, ablate.positions) == ((1, 3), "", None)
    steer = parse_intervention("A", fields(intervention="steer", heads="x", steer_negative="Hate",
                                           patch_site="nowhere"))
    assert (steer.heads, steer.positive, steer.negative, steer.site) == (None, "Love", "Hate", "resid_post")
    z = parse_intervention("A", fields(intervention="patch from other column", patch_site="z",
                                       patch_positions="3, 4", steer_scale="big"))
    assert (z.site, z.heads, z.positions) == ("z", (0, 2), (3, 4))


@pytest.mark.parametrize("changes, message", [
    (dict(intervention="ablate heads", heads=""), "column A: ablate heads: list the heads to ablate"),
    (dict(intervention="ablate heads", heads="x"), "column A: ablate heads: heads: 'x' is not a list"),
    (dict(intervention="steer"), "column A: steer: give both texts of the contrast pair"),
    (dict(intervention="patch from other column", patch_site="z", heads="x", patch_positions=""),
     "column A: patch from other column: heads: 'x' is not a list"),
    (dict(intervention="patch from other column"), "column A: patch from other column: positions: 'one, two'"),
    (dict(intervention="patch from other column", layer=""), "column A: patch from other column: give one layer"),
])
def test_fields_that_apply_are_still_checked(changes, message):
    with pytest.raises(SettingsError) as err:
        parse_intervention("A", fields(**changes))
    assert str(err.value).startswith(message)


# ------------------------------------------------------------------ the app, as the API tests run it
@pytest.fixture(scope="module")
def app():
    from test_app_api import free_port

    from gemma3_lab.app.ui import ModelRegistry, build_app

    demo = build_app(ModelRegistry(root=None))
    port = free_port()
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    demo.url = f"http://127.0.0.1:{port}/"
    yield demo
    demo.close()


@pytest.fixture()
def client(app):
    return Client(app.url, verbose=False)


def values(**changes) -> dict:
    from test_app_api import settings

    return settings(**changes)


@pytest.fixture()
def png(tmp_path) -> str:
    path = tmp_path / "red.png"
    Image.new("RGB", (40, 30), (200, 30, 30)).save(path)
    return str(path)


@pytest.mark.real  # the app's default model, gemma-3-270m
def test_switching_ablate_to_patch_in_the_page_runs(client):
    """The user's steps: heads "0, 2" typed for an ablation, then the kind switched to a patch of
    the residual from the unchanged column A — which reproduces A."""
    out = client.predict(**values(b_intervention="patch from other column", b_layer=17, b_heads="0, 2",
                                  b_patch_site="resid_post", a_max_new_tokens=2, b_max_new_tokens=2),
                         api_name="/generate")[-1]
    assert out["B"]["error"] is None and out["A"]["token_ids"] == out["B"]["token_ids"]
    assert out["B"]["intervention"] == "resid_post of layer 17 patched from the other column at every prompt position"


# ------------------------------------------------------------------ 2. error messages close by themselves
@pytest.mark.real  # the app's default model, gemma-3-270m
def test_generate_errors_close_by_themselves(app):
    from gemma3_lab.app.ui.events import GENERATE_PARAMS, make_generate
    from gemma3_lab.app.ui.session import Session

    generate = make_generate(app.registry)
    v = values(prompt="  ")
    with pytest.raises(gr.Error) as err:
        list(generate(*[v.get(p) for p in GENERATE_PARAMS], Session()))
    assert err.value.message.startswith("the prompt is empty")
    assert err.value.duration == TOAST_SECONDS and math.isfinite(TOAST_SECONDS) and TOAST_SECONDS > 0


def test_no_error_message_is_made_to_stay():
    """Every `gr.Error` of the app closes by itself: no `duration=None` (a toast that never closes)."""
    stuck = []
    for path in APP.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and ast.unparse(node.func) == "gr.Error":
                for kw in node.keywords:
                    if kw.arg == "duration" and isinstance(kw.value, ast.Constant) and kw.value.value is None:
                        stuck.append(f"{path.relative_to(APP)}:{node.lineno}")
    assert stuck == []


# ------------------------------------------------------------------ 4. and 5. one column's error
@pytest.mark.real  # the app's default model, gemma-3-270m
def test_one_columns_error_leaves_no_column_loading(app, png):
    """A on demo-multimodal (loaded on first use), B on the text-only 270M, one image: B cannot
    start; the last statuses the page gets say so in both columns, none stays at "loading…"."""
    from gemma3_lab.app.ui.events import GENERATE_PARAMS, make_generate
    from gemma3_lab.app.ui.registry import ModelRegistry
    from gemma3_lab.app.ui.session import Session

    # a fresh registry (A's model is loaded "for the first time") that hands out the app's models
    registry = ModelRegistry(root=None, loader=lambda key: app.registry.get(key).model)
    registry.get(BUNDLED)  # B's model is in memory already, as the app preloads it
    generate = make_generate(registry)
    v = values(prompt="Describe:", images=[png], a_model="demo-multimodal", b_model=BUNDLED)
    shown = []
    with pytest.raises(gr.Error) as err:
        for out in generate(*[v.get(p) for p in GENERATE_PARAMS], Session()):
            shown.append(out)
    assert any("loading demo-multimodal" in out[0] for out in shown)  # the page did see "loading…" first
    status_a, tokens_a, status_b, tokens_b = shown[-1][:4]
    assert "loading" not in status_a
    assert "not run: column B could not start" in status_a
    assert "not run" in tokens_a
    assert err.value.message == text_only("B")
    assert html.unescape(status_b).endswith("⚠ not run: " + text_only("B").removeprefix("column B: "))


@pytest.mark.real  # the app's default model, gemma-3-270m
def test_text_only_message_speaks_to_the_page(client, png, app):
    with pytest.raises(Exception) as err:
        client.predict(**values(images=[handle_file(png)]), api_name="/generate")
    message = str(err.value)
    assert text_only("A") in message  # both columns are text-only: A, checked first, fails first
    assert "gl.load" not in message and "model box" in message and '"demo-multimodal"' in message
    # the library keeps its own advice, for Python users
    with pytest.raises(ValueError, match=r"gl\.load\('demo-multimodal'\)"):
        app.registry.get(BUNDLED).model.processor("<start_of_image>x", images=[Image.open(png)])
