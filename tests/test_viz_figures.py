"""Figures show what they claim: every image's data equals the cache tensor (or mask) it is
drawn from, and the axis labels are the prompt's tokens. Real 270M, one short prompt."""

from __future__ import annotations

import math
from types import SimpleNamespace

import matplotlib
import numpy as np
import pytest
import torch

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from gemma3_lab.viz import attention as A  # noqa: E402
from gemma3_lab.viz import lens as LV  # noqa: E402
from gemma3_lab.viz.atlas import allowed, mask_atlas  # noqa: E402
from gemma3_lab.viz.common import dense, token_labels  # noqa: E402
from gemma3_lab.viz.mask_visualizer import AttentionMaskVisualizer  # noqa: E402

PROMPT = "The capital of France is Paris. The capital of Italy is"
NAMES = ["blocks.*.attn.hook_pattern", "blocks.*.attn.hook_mask", "blocks.0.hook_resid_pre", "blocks.*.hook_resid_post"]


@pytest.fixture(scope="module")
def run(real_model):
    inputs = real_model.processor(PROMPT)
    logits, cache = real_model.run_with_cache(inputs, names_filter=NAMES)
    tokens = token_labels(real_model.tokenizer, inputs.input_ids, real_model.config)
    yield SimpleNamespace(model=real_model, inputs=inputs, logits=logits, cache=cache, tokens=tokens)
    plt.close("all")


def ticks(ax, axis="x") -> list[str]:
    labels = ax.get_xticklabels() if axis == "x" else ax.get_yticklabels()
    return [t.get_text() for t in labels]


def data(im) -> np.ndarray:
    return np.ma.getdata(im.get_array())


def test_mask_figure_is_hook_mask(run):
    view = AttentionMaskVisualizer(run.model).view(PROMPT)
    fig = view.figure()
    panel_axes = [ax for ax in fig.axes if ax.images]
    assert len(panel_axes) == len(view.panels) == 2
    for ax, p in zip(panel_axes, view.panels):
        arr = data(ax.images[0])
        assert np.array_equal(arr, p.classes.numpy())
        for i in p.layers:
            assert np.array_equal(allowed(arr), run.cache["mask", i][0, 0].numpy())
        assert ticks(ax, "x") == run.tokens and ticks(ax, "y") == run.tokens
        assert p.title in ax.get_title()


def test_atlas_every_layer(run):
    fig = mask_atlas(run.model, PROMPT, window=4)
    axes = [ax for ax in fig.axes if ax.images]
    assert len(axes) == 18
    windows = [4 if t.short == "local" else None for t in run.model.config.text.layer_types]
    from gemma3_lab.model.masks import model_masks

    expected = model_masks(windows, len(run.tokens))
    for i, ax in enumerate(axes):
        kind = run.model.config.text.layer_types[i].short
        assert ax.get_title().startswith(f"L{i} {kind}")
        assert np.array_equal(allowed(data(ax.images[0])), expected[i][0, 0].numpy())
    # with the model's own window (512 > prompt) each layer's picture is its hook_mask
    for i, ax in enumerate(a for a in mask_atlas(run.model, PROMPT).axes if a.images):
        assert np.array_equal(allowed(data(ax.images[0])), run.cache["mask", i][0, 0].numpy())


def test_heatmap_is_pattern(run):
    for layer, head in [(0, 0), (5, 3), (17, 1)]:
        fig = A.attention_heatmap(run.cache, layer, head, run.tokens)
        ax = fig.axes[0]
        im = ax.images[0]
        want = dense(run.cache["pattern", layer])[0, head].float().numpy()
        assert np.array_equal(data(im), want)
        # cells the layer may not attend to are drawn as masked (grey), the others are not
        assert np.array_equal(~np.ma.getmaskarray(im.get_array()), run.cache["mask", layer][0, 0].numpy())
        assert ticks(ax, "x") == run.tokens and ticks(ax, "y") == run.tokens
        assert f"Layer {layer}" in ax.get_title() and f"head {head}" in ax.get_title()


def test_head_grid_is_every_head(run):
    fig = A.head_grid(run.cache, 3, run.tokens)
    axes = [ax for ax in fig.axes if ax.images]
    p = dense(run.cache["pattern", 3])[0].float()
    assert len(axes) == p.shape[0] == 4
    for h, ax in enumerate(axes):
        assert np.array_equal(data(ax.images[0]), p[h].numpy())
        assert ax.get_title() == f"head {h}"
        assert ticks(ax, "x") == run.tokens


def test_token_view_rows(run):
    q = len(run.tokens) - 1
    fig = A.token_view(run.cache, q, run.tokens)
    arr = data(fig.axes[0].images[0])
    want = torch.cat([dense(run.cache["pattern", i])[0, :, q].float() for i in range(18)])
    assert arr.shape == (18 * 4, len(run.tokens))
    assert np.array_equal(arr, want.numpy())
    assert ticks(fig.axes[0], "x") == run.tokens
    assert ticks(fig.axes[0], "y")[5] == "L5 g"


def test_residual_norms_lines(run):
    fig = LV.residual_norms(run.cache, run.tokens)
    lines = fig.axes[0].get_lines()
    norms = torch.stack([run.cache["blocks.0.hook_resid_pre"][0].norm(dim=-1)] +
                        [run.cache[f"blocks.{i}.hook_resid_post"][0].norm(dim=-1) for i in range(18)])
    bos = [ln for ln in lines if ln.get_label() == "<bos> (slot 0)"][0]
    assert np.allclose(bos.get_ydata(), norms[:, 0].numpy(), rtol=0, atol=0)
    per_position = [ln for ln in lines if ln.get_label().startswith("_")]  # unlabelled thin lines
    assert len(per_position) == len(run.tokens) - 1
    assert np.array_equal(per_position[2].get_ydata(), norms[:, 3].numpy())


def test_logit_lens_grid_cells():
    L1, S, k = 4, 6, 3
    g = torch.Generator().manual_seed(0)
    probs = torch.rand(L1, S, k, generator=g).sort(dim=-1, descending=True).values
    top_tokens = [[[f"t{r}{c}{j}" for j in range(k)] for c in range(S)] for r in range(L1)]
    lens = SimpleNamespace(layer_labels=["embed", "L0", "L1", "L2"], tokens=[f"in{c}" for c in range(S)],
                           top_ids=torch.zeros(L1, S, k, dtype=torch.long), top_probs=probs,
                           top_tokens=top_tokens, positions=None)
    fig = LV.logit_lens_grid(lens, max_positions=4)
    ax = fig.axes[0]
    assert np.array_equal(data(ax.images[0]), probs[:, 2:, 0].numpy())
    cells = [t.get_text() for t in ax.texts]
    assert cells == [top_tokens[r][c][0] for r in range(L1) for c in range(2, S)]
    assert ticks(ax, "y") == lens.layer_labels
    assert ticks(ax, "x") == [f"in{c} ({c})" for c in range(2, S)]


def test_logit_lens_grid_real(run):
    """The grid of the model's own logit lens (`cache.logit_lens`) shows its top-1 probabilities."""
    from gemma3_lab.viz.common import fig_label, printable

    lens = run.cache.logit_lens(3)
    fig = LV.logit_lens_grid(lens, config=run.model.config)
    ax = fig.axes[0]
    S = len(run.tokens)
    assert np.array_equal(data(ax.images[0]), lens.top_probs[:, :, 0].float().numpy())
    assert ticks(ax, "y") == ["embed"] + [f"L{i}" for i in range(18)]
    last = [t.get_text() for t in ax.texts][-S:]  # the bottom row: after the last layer
    assert last == [fig_label(printable(lens.top_tokens[18][c][0]), 9) for c in range(S)]
    # the bottom row is the model's own next-token prediction
    assert torch.equal(lens.top_ids[18, :, 0], run.logits[0].argmax(-1).cpu())


def test_selected_positions_and_heads(run):
    """A cache that kept some query positions and heads is drawn with the right rows and head ids."""
    keep = [3, len(run.tokens) - 1]
    _, cache = run.model.run_with_cache(run.inputs, names_filter=NAMES[:2], positions=keep, heads=[1, 3])
    fig = A.attention_heatmap(cache, 5, 3, run.tokens)
    want = dense(run.cache["pattern", 5])[0, 3][keep].float().numpy()
    assert np.array_equal(data(fig.axes[0].images[0]), want)
    assert ticks(fig.axes[0], "y") == [f"{k} {run.tokens[k]}" for k in keep]
    grid = A.head_grid(cache, 5, run.tokens)
    assert [ax.get_title() for ax in grid.axes if ax.images] == ["head 1", "head 3"]
    rows = A.token_view_data(cache, keep[1])[0]
    full = torch.cat([dense(run.cache["pattern", i])[0, [1, 3], keep[1]].float() for i in range(18)])
    assert torch.equal(rows, full)
    with pytest.raises(ValueError, match="not captured"):
        A.attention_heatmap(cache, 5, 0, run.tokens)


def test_surprisal(run):
    ids = run.inputs.input_ids
    bits = LV.surprisal_bits(run.logits, ids)
    assert math.isnan(bits[0])
    for t in (1, 5, len(run.tokens) - 1):
        p = torch.softmax(run.logits[0, t - 1].double(), -1)[ids[0, t]]
        assert abs(float(bits[t]) - float(-torch.log2(p))) < 1e-3
    fig = LV.surprisal_text(run.tokens, bits)
    texts = [t.get_text() for t in fig.texts if t.get_gid() == "token"]
    assert texts == [LV._display(t) for t in run.tokens]
    h = LV.surprisal_html(run.tokens, bits)
    assert h.count("<span") == len(run.tokens) and "bits" in h
