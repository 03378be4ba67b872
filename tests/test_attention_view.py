"""The browser views' payloads (gemma3_lab/app/ui/attention_view.py) against the captured
tensors of a tiny random model: every weight shipped is the pattern rounded once to the
stated decimals, band storage and dense tensors give one payload, a generation's capture feeds
it, and bad input is one clear line. The page itself: tests/test_attention_view_browser.py."""

from __future__ import annotations

import base64

import numpy as np
import pytest
import torch
from helpers import random_gemma

from gemma3_lab.app.ui.attention_view import attention_payload, logit_lens_payload
from gemma3_lab.config import Gemma3Config, TextConfig, pattern_layer_types
from gemma3_lab.errors import Gemma3LabError
from gemma3_lab.explorer import Gemma3
from gemma3_lab.model.banded import BandedPattern

NAMES = ["blocks.*.attn.hook_pattern", "blocks.0.hook_resid_pre", "blocks.*.hook_resid_post"]


def tiny_model() -> Gemma3:
    """Window 3, layers (local, global, local, global), 4 heads on 2 kv heads, random weights."""
    text = TextConfig(vocab_size=300, hidden_size=64, intermediate_size=96, num_layers=4, num_heads=4,
                      num_kv_heads=2, head_dim=16, query_pre_attn_scalar=16, sliding_window=3,
                      layer_types=pattern_layer_types(4, 2))
    return random_gemma(Gemma3Config(text, name="tiny"))


@pytest.fixture(scope="module")
def model():
    return tiny_model()


@pytest.fixture(scope="module")
def cache(model):
    return model.run_with_cache(torch.arange(2, 16)[None], NAMES)[1]


def pieces(n: int) -> list[str]:
    return [f"▁w{i}" for i in range(n)]


def unpack(payload: dict) -> dict[int, np.ndarray]:
    """{layer: (N, Q, T) integer weights} rebuilt from a payload, zeros where nothing was sent."""
    out = {}
    N, Q, T = payload["n_heads"], len(payload["positions"]), len(payload["tokens"])
    for L in payload["layers"]:
        flat = np.frombuffer(base64.b64decode(L["data"]), dtype="<u2").reshape(N, -1)
        full = np.zeros((N, Q, T), dtype=np.int64)
        a = 0
        for r, (lo, n) in enumerate(zip(L["lo"], L["len"])):
            full[:, r, lo : lo + n] = flat[:, a : a + n]
            a += n
        assert a == flat.shape[1]
        out[L["layer"]] = full
    return out


def test_every_weight_is_the_pattern_rounded_once(model, cache):
    assert isinstance(cache["pattern", 0], BandedPattern)  # the local layers arrive as bands
    text = model.config.text
    p = attention_payload(pieces(14), {i: cache["pattern", i] for i in range(4)}, text.layer_types,
                          text.sliding_window)
    assert p["scale"] == 1000 and p["decimals"] == 3 and p["n_heads"] == 4 and p["positions"] == list(range(14))
    assert [L["type"] for L in p["layers"]] == ["local", "global", "local", "global"]
    assert [L["window"] for L in p["layers"]] == [3, None, 3, None]
    got = unpack(p)
    for i in range(4):
        dense = cache["pattern", i].to_dense()[0].double().numpy()  # (N, S, T)
        assert np.array_equal(got[i], np.rint(dense * 1000).astype(np.int64)), i
        assert np.abs(got[i] / 1000 - dense).max() <= 0.0005 + 1e-12
    local = p["layers"][0]
    assert max(local["len"]) == 3 and local["lo"][13] == 11  # a band: the last query keeps slots 11..13


def test_bands_and_dense_tensors_give_one_payload(model, cache):
    text = model.config.text
    band = cache["pattern", 2]
    a = attention_payload(pieces(14), {2: band}, text.layer_types, 3)
    b = attention_payload(pieces(14), {2: band.to_dense()}, text.layer_types, 3)
    c = attention_payload(pieces(14), {2: band.to_dense()[0].numpy()}, text.layer_types, 3)
    assert a == b == c


def test_query_positions_keep_those_rows(model, cache):
    text = model.config.text
    pats = {i: cache["pattern", i] for i in (0, 1)}
    full = unpack(attention_payload(pieces(14), pats, text.layer_types, 3))
    part = attention_payload(pieces(14), pats, text.layer_types, 3, query_positions=[3, 9])
    assert part["positions"] == [3, 9]
    for i, rows in unpack(part).items():
        assert np.array_equal(rows, full[i][:, [3, 9]])


def test_a_generation_capture_feeds_the_view(model):
    res = model.generate(torch.arange(2, 9)[None], max_new_tokens=4, capture=["blocks.*.attn.hook_pattern"])
    n = len(res.prompt_ids) + len(res.token_ids)
    pats = {i: res.captures[f"blocks.{i}.attn.hook_pattern"].tensor() for i in range(4)}
    p = attention_payload(pieces(n), pats, model.config.text.layer_types, 3)
    assert p["positions"] == list(range(n - 1))  # the last token was chosen, never fed
    _, once = model.run_with_cache(torch.tensor([res.prompt_ids + res.token_ids[:-1]]), NAMES[:1])
    got = unpack(p)
    for i in range(4):
        want = np.rint(once["pattern", i].to_dense()[0].double().numpy() * 1000)
        assert np.abs(got[i][:, :, : n - 1] - want).max() <= 1  # decode steps vs one forward: float32 noise


def test_the_lens_payload_is_the_lens(cache):
    lens = cache.logit_lens(k=3)
    p = logit_lens_payload(lens)
    assert p["layers"] == ["embed", "L0", "L1", "L2", "L3"] and p["k"] == 3 and p["positions"] == list(range(14))
    probs = np.asarray(p["probs"])
    assert np.array_equal(probs, np.rint(lens.top_probs.double().numpy() * 1000).astype(int))
    shown = [[[p["pieces"][j] for j in cell] for cell in row] for row in p["top"]]
    assert shown == lens.top_tokens


@pytest.mark.parametrize("call, message", [
    (lambda c, t: attention_payload(pieces(14), {0: c["pattern", 0]}, t, 3, decimals=5), "decimals must be 1..4"),
    (lambda c, t: attention_payload(pieces(14), {7: c["pattern", 0]}, t, 3), "layer 7 is not one of the model's 4"),
    (lambda c, t: attention_payload(pieces(14), {0: c["pattern", 0]}, t, 3, query_positions=[20]),
     r"layer 0: no attention row for position\(s\) \[20\]"),
    (lambda c, t: attention_payload(pieces(14), {1: c["pattern", 1]}, t, 3, query_positions=[20]),
     r"layer 1: position\(s\) \[20\] outside the 14 rows"),
    (lambda c, t: attention_payload(pieces(5), {1: c["pattern", 1]}, t, 3), "14 key slots but only 5 tokens"),
    (lambda c, t: attention_payload(pieces(14), {1: c["pattern", 1]}, t, 3, max_values=100), "over 100 weights"),
    (lambda c, t: attention_payload(pieces(14), {1: torch.zeros(14, 14)}, t, 3), r"got shape \(14, 14\)"),
    (lambda c, t: attention_payload(pieces(14), {}, t, 3), "at least one layer"),
])
def test_bad_input_is_one_clear_line(model, cache, call, message):
    with pytest.raises(Gemma3LabError, match=message):
        call(cache, model.config.text.layer_types)
