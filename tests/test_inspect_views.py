"""What a look ships to the browser: the inspected slot always, then the generated tokens'
queries, then the nearest prompt slots within the weight budget; and link pre-fill's
conversions, each bad value one line naming the field."""

from __future__ import annotations

import gradio as gr
import pytest

from gemma3_lab.app.ui.inspect_views import row_cost, rows_to_ship
from gemma3_lab.app.ui.prefill import convert, make_prefill
from gemma3_lab.config import BUNDLED, PRESETS

CFG = PRESETS[BUNDLED].text


def test_row_cost_counts_the_keys_each_layer_can_reach():
    w, n = CFG.sliding_window, CFG.num_heads
    n_global = len(CFG.global_layers)
    n_local = CFG.num_layers - n_global
    assert row_cost(CFG, 0) == CFG.num_layers * n  # the first slot sees itself only
    q = w + 100  # past the window: local layers stop at w keys, global ones see q + 1
    assert row_cost(CFG, q) == n * (n_local * w + n_global * (q + 1))


def test_a_short_sequence_ships_every_row():
    assert rows_to_ship(CFG, 20, 7, 6) == list(range(20))


@pytest.mark.parametrize("length,query,n_prompt", [(1000, 300, 976), (4000, 10, 3990), (3000, 2999, 2990)])
def test_a_long_sequence_ships_the_query_the_generated_then_the_nearest(length, query, n_prompt):
    budget = 1_500_000
    rows = rows_to_ship(CFG, length, query, n_prompt, budget)
    assert query in rows and set(range(n_prompt - 1, length)) <= set(rows)
    assert sum(row_cost(CFG, p) for p in rows) <= budget
    prompt = [p for p in rows if p < n_prompt - 1 and p != query]
    assert prompt, "some prompt slots fit"
    # the prompt slots that travel are the ones nearest the query (a contiguous run around it)
    far = max(abs(p - query) for p in prompt)
    left_out = [p for p in range(n_prompt - 1) if p not in rows]
    assert all(abs(p - query) >= far for p in left_out)


class Request:
    def __init__(self, **params):
        self.query_params = params


def fields():
    return {"prompt": gr.Textbox(), "chat": gr.Checkbox(), "a_max_new_tokens": gr.Number(precision=0),
            "a_temperature": gr.Number(), "b_decoding": gr.Radio(["greedy", "sample"]),
            "b_model": gr.Dropdown(["gemma-3-270m"], allow_custom_value=True)}


def test_link_parameters_fill_the_fields_they_name():
    out = make_prefill(fields())(Request(prompt="Paris is", chat="true", a_max_new_tokens="3", a_temperature="0.7",
                                         b_decoding="sample", b_model="/models/tiny"))
    assert out == ["Paris is", True, 3, 0.7, "sample", "/models/tiny"]


def test_a_link_without_parameters_changes_nothing():
    out = make_prefill(fields())(Request())
    assert all(isinstance(v, type(gr.skip())) for v in out)


@pytest.mark.parametrize("name,raw,why", [
    ("a_max_new_tokens", "abc", "a_max_new_tokens='abc': expected a number"),
    ("a_max_new_tokens", "2.5", "expected a whole number"),
    ("chat", "maybe", "chat='maybe': expected true or false"),
    ("b_decoding", "beam", "b_decoding='beam': expected one of greedy, sample"),
])
def test_a_bad_link_value_is_named(name, raw, why):
    with pytest.raises(ValueError, match=why.replace("(", r"\(")):
        convert(name, fields()[name], raw)


def test_bad_and_unknown_parameters_warn_once_and_the_rest_still_fill(monkeypatch):
    warned = []
    monkeypatch.setattr(gr, "Warning", lambda msg, duration=None: warned.append(msg))
    out = make_prefill(fields())(Request(prompt="hi", a_max_new_tokens="abc", colour="red"))
    assert out[0] == "hi" and isinstance(out[2], type(gr.skip()))
    assert len(warned) == 1 and "a_max_new_tokens='abc'" in warned[0] and "colour" in warned[0]
