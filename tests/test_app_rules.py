"""Each rule the app shares with the library lives in one place: the length of a generation
(`gemma3_lab.generate.check_length`, called by generate, generate_batch and the app), the
app's number parsers and layer/head checks (`app.ui.checks`), the comparison's summary line."""

from __future__ import annotations

import pytest
import torch

from gemma3_lab.config import BUNDLED, PRESETS
from gemma3_lab.errors import Gemma3LabError
from gemma3_lab.generate import check_length


def test_check_length_is_the_one_rule(tiny_gqa):
    cfg = PRESETS[BUNDLED]
    check_length(cfg, 32_000, 768)  # exactly the context
    with pytest.raises(Gemma3LabError, match=r"the prompt \(32,000 tokens\) \+ max_new_tokens \(769\): 32,769 "
                                             "tokens, more than gemma-3-270m's context of 32,768 tokens"):
        check_length(cfg, 32_000, 769)
    with pytest.raises(Gemma3LabError, match="past this app's limit of 10 prompt tokens; shorten"):
        check_length(cfg, 11, 1, 10, "this app's limit", "; shorten")
    check_length(cfg, 10, 1, 10, "this app's limit")
    # generate and generate_batch say the same (the tiny model's context is 64)
    from gemma3_lab.generate_batch import RowSettings, generate_batch

    ids = torch.zeros(1, 60, dtype=torch.long)
    with pytest.raises(Gemma3LabError, match="65 tokens, more than tiny-gqa's context of 64 tokens"):
        tiny_gqa.generate(ids, max_new_tokens=5)
    with pytest.raises(Gemma3LabError, match=r"row 1: the prompt \(60 tokens\) \+ max_new_tokens \(5\): 65 tokens"):
        generate_batch(tiny_gqa, ids, [RowSettings(max_new_tokens=1), RowSettings(max_new_tokens=5)])


def test_number_parsers_and_range_checks():
    from gemma3_lab.app.ui.checks import ALL_HEADS, SettingsError, check_head, check_layer, number, whole, whole_list

    cfg = PRESETS[BUNDLED]
    assert whole("layer", "3") == whole("layer", 3.0) == 3 and number("t", "0.5") == 0.5
    assert whole_list("heads", "0, 2 3") == [0, 2, 3] and whole_list("heads", " ") is None
    for bad, message in [("x", "layer: 'x' is not a number"), (2.5, "layer: 2.5 must be a whole number"),
                         ("nan", "is not a finite number")]:
        with pytest.raises(SettingsError, match=message):
            whole("layer", bad)
    with pytest.raises(SettingsError, match=r"heads: '0, x' is not a list of whole numbers \(e.g. 0, 2\)"):
        whole_list("heads", "0, x")
    with pytest.raises(SettingsError, match="top-p: 1.5 must be ≤ 1"):
        number("top-p", 1.5, lo=0, lo_open=True, hi=1)
    assert check_layer(cfg, "17") == 17 and check_head(cfg, None, allow_all=True) == ALL_HEADS
    with pytest.raises(SettingsError, match="layer 18 does not exist: gemma-3-270m has layers 0–17"):
        check_layer(cfg, 18)
    with pytest.raises(SettingsError, match="head 4 does not exist"):
        check_head(cfg, 4, allow_all=True)
    with pytest.raises(SettingsError, match="head -1 does not exist"):
        check_head(cfg, -1)  # an intervention names real heads only


def test_the_images_tab_and_interventions_use_the_same_checks():
    from gemma3_lab.app.ui.checks import SettingsError
    from gemma3_lab.app.ui.images_tab import parse_layers
    from gemma3_lab.app.ui.intervene import parse_intervention

    cfg = PRESETS[BUNDLED]
    assert parse_layers("L3", cfg) == [3] and parse_layers("global layers", cfg) == list(cfg.text.global_layers)
    with pytest.raises(SettingsError, match="layer 30 does not exist: gemma-3-270m has layers 0–17"):
        parse_layers("L30", cfg)
    with pytest.raises(SettingsError, match="scale: 'big' is not a number"):
        parse_intervention("A", {"intervention": "steer", "layer": 5, "steer_positive": "a", "steer_negative": "b",
                                 "steer_scale": "big"})
    spec = parse_intervention("B", {"intervention": "ablate heads", "layer": "5", "heads": "0, 2.0"})
    assert (spec.layer, spec.heads) == (5, (0, 2))


def test_comparison_summary_line(tiny_gqa):
    from gemma3_lab.analysis.compare import compare

    c = compare(tiny_gqa, tiny_gqa, torch.tensor([[1, 5, 7, 9]]), labels=("A: x", "B: y"))
    line = c.summary(by_layer=False)
    assert line == c.summary().splitlines()[0] and "\n" not in line
    assert line.startswith("B: y vs A: x on 4 tokens") and "top-1 agreement 100.0%" in line


def test_the_divergence_line_says_what_each_column_gave_the_others_token(tiny_gqa):
    """The app's divergence line reads both step records at the first difference: each
    column's probability of the other's token from its recorded top k, and how many nats
    below (or, for a sampled column, above) its own choice that is."""
    import math

    from gemma3_lab.app.ui.render import divergence_line

    ids = torch.tensor([[2, 7, 40, 3]])
    a = tiny_gqa.generate(ids, max_new_tokens=12, stop_ids=())
    assert divergence_line(a, a) == "A and B chose the same 12 tokens."
    b = next(r for seed in range(50)
             for r in [tiny_gqa.generate(ids, max_new_tokens=12, stop_ids=(), do_sample=True, temperature=3.0, seed=seed)]
             if (d := a.first_divergence(r)) is not None and r.steps[d].token_id in a.steps[d].top_k_ids)
    d = a.first_divergence(b)
    sa, sb = a.steps[d], b.steps[d]
    line = divergence_line(a, b)
    p = dict(zip(sa.top_k_ids, (q for _, q in sa.top_k)))[sb.token_id]
    assert d > 0 and line.startswith(f"A and B first differ at step {d}: A chose {sa.token!r} (p = {sa.prob:.4g}), "
                                     f"B chose {sb.token!r} (p = {sb.prob:.4g}). ")
    assert f"A gave {sb.token!r} p = {p:.4g}, {math.log(sa.prob / p):.2f} nats below its choice" in line
    if sa.token_id in sb.top_k_ids:
        q = dict(zip(sb.top_k_ids, (x for _, x in sb.top_k)))[sa.token_id]
        gap = math.log(sb.prob / q)
        assert f"B gave {sa.token!r} p = {q:.4g}, {abs(gap):.2f} nats {'below' if gap >= 0 else 'above'}" in line
    else:
        assert f"{sa.token!r} was not in B's top {len(sb.top_k_ids)}" in line
    short = tiny_gqa.generate(ids, max_new_tokens=d, stop_ids=())  # A's first d tokens, then it stops
    assert divergence_line(short, a) == f"A and B agree on their first {d} tokens; then one of them stops."
