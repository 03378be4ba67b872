"""Image visuals put every soft token where it came from: each of the 256 tokens of each crop
maps to its cell of the crop box on the ORIGINAL picture (checked against the processor's own
pixels), a one-hot attention lights exactly that cell, and the token strip follows the ids."""

from __future__ import annotations

import matplotlib
import numpy as np
import pytest
import torch
from PIL import Image

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from gemma3_lab.config import PRESETS  # noqa: E402
from gemma3_lab.prompt.processor import Processor  # noqa: E402
from gemma3_lab.viz import images as I  # noqa: E402

W, H = 900, 300  # wide enough for three pan-and-scan crops of 300×300


def gradient_picture() -> Image.Image:
    """Red grows to the right, green downwards: a pixel's colour says where it is."""
    x = np.linspace(0, 255, W)[None, :].repeat(H, 0)
    y = np.linspace(0, 255, H)[:, None].repeat(W, 1)
    return Image.fromarray(np.stack([x, y, np.full_like(x, 40)], -1).round().astype(np.uint8))


@pytest.fixture(scope="module")
def inputs(real_model):
    cfg = PRESETS["gemma-3-4b"]  # real geometry: 896 px, 256 tokens per crop; no weights needed
    out = Processor(real_model.tokenizer, cfg)("Look <start_of_image> here", images=[gradient_picture()],
                                                pan_and_scan=True)
    yield out, cfg
    plt.close("all")


def test_spans_cover_whole_picture_and_crops(inputs):
    x, _ = inputs
    boxes = [s.box for s in I.image_spans(x, 0)]
    assert boxes == [(0, 0, 900, 300), (0, 0, 300, 300), (300, 0, 600, 300), (600, 0, 900, 300)]


def test_overlay_maps_every_token_to_its_cell(inputs):
    """Each pixel of a crop box carries the id of the token whose cell holds its centre."""
    x, _ = inputs
    for s in I.image_spans(x, 0):
        ids = I.overlay_array(np.arange(256), s, (W, H))
        l, t, r, b = s.box
        assert np.isnan(ids[:, :l]).all() and np.isnan(ids[:, r:]).all()
        cw, ch = (r - l) / 16, (b - t) / 16
        for tok in range(256):
            row, col = divmod(tok, 16)
            ys, xs = np.nonzero(ids == tok)  # the region of the picture token `tok` covers
            assert xs.min() == int(np.ceil(l + col * cw - 0.5)) and xs.max() == int(np.ceil(l + (col + 1) * cw - 0.5)) - 1
            assert ys.min() == int(np.ceil(t + row * ch - 0.5)) and ys.max() == int(np.ceil(t + (row + 1) * ch - 0.5)) - 1
            assert len(xs) == (xs.max() - xs.min() + 1) * (ys.max() - ys.min() + 1)  # a full rectangle


def test_cells_match_what_the_tower_sees(inputs):
    """The colour the processor puts in token t's 56×56 block of the resized crop equals the
    mean colour of t's region of the original picture (a gradient makes position visible)."""
    x, _ = inputs
    orig = np.asarray(x.images[0], dtype=np.float64)  # (H, W, 3)
    for s in I.image_spans(x, 0):
        px = x.pixel_values[s.pixel_index].double() * 127.5 + 127.5  # (3, 896, 896) back to 0..255
        blocks = px.reshape(3, 16, 56, 16, 56).mean(dim=(2, 4))  # (3, 16, 16) per token cell
        ids = I.overlay_array(np.arange(256), s, (W, H))
        for tok in range(0, 256, 5):
            region = orig[ids == tok]  # (n, 3)
            row, col = divmod(tok, 16)
            seen = blocks[:2, row, col].numpy()
            assert np.abs(region[:, :2].mean(0) - seen).max() < 2.5, (s.crop, tok)


def test_one_hot_attention_lights_its_cell(inputs):
    x, cfg = inputs
    T = x.input_ids.shape[1]
    q = T - 1
    spans = I.image_spans(x, 0)
    for s in spans:
        for tok in (0, 15, 17, 128, 255):
            pat = torch.zeros(1, 1, T, T)
            pat[0, 0, q, s.start + tok] = 1.0
            fig = I.image_attention([pat], x, query=q, layers=[0], config=cfg, tokens=["x"] * T)
            axes = [ax for ax in fig.axes if len(ax.images) == 2]  # picture + overlay
            assert len(axes) == len(spans)
            for ax, other in zip(axes, spans):
                ov = ax.images[1]
                l, t, r, b = other.box
                assert tuple(ov.get_extent()) == (l, r, b, t)  # drawn over exactly the crop box
                arr = np.ma.getdata(ov.get_array())
                expect = np.zeros((16, 16))
                if other is s:
                    expect[divmod(tok, 16)] = 1.0
                assert np.array_equal(arr, expect)
            plt.close(fig)


def test_span_attention_average(inputs):
    x, cfg = inputs
    T = x.input_ids.shape[1]
    g = torch.Generator().manual_seed(0)
    pats = [torch.rand(1, 2, T, T, generator=g) for _ in range(3)]
    s = I.image_spans(x, 0)[1]
    got = I.span_attention(pats, s, T - 1, layers=[0, 2], heads=[1])
    assert torch.allclose(got, (pats[0][0, 1, T - 1, s.start:s.end] + pats[2][0, 1, T - 1, s.start:s.end]) / 2)


def test_token_strip_codes(inputs, real_model):
    x, cfg = inputs
    fig = I.token_strip(x, real_model.tokenizer, cfg)
    codes = I.strip_codes(x, cfg)
    arr = np.ma.getdata(fig.axes[0].images[0].get_array())
    assert np.array_equal(arr[0], codes.numpy())
    soft = x.token_types[0] == 1
    assert torch.equal(codes >= 2, soft)
    spans = sorted(x.image_spans, key=lambda s: s.start)
    for k, s in enumerate(spans):
        assert (codes[s.start:s.end] == 2 + k).all()
        assert codes[s.start - 1] == I.SPECIAL and codes[s.end] == I.SPECIAL  # <start/end_of_image>
    texts = [t.get_text() for t in fig.axes[1].texts]
    assert "0 <bos>" in texts and any("256 soft tokens" in t for t in texts)


def test_picture_grid_panels(inputs):
    x, cfg = inputs
    fig = I.picture_grid(x, config=cfg)
    axes = [ax for ax in fig.axes if ax.images]
    spans = I.image_spans(x, 0)
    assert len(axes) == len(spans)
    for ax, s in zip(axes, spans):
        assert f"slots {s.start}–{s.end - 1}" in ax.get_title()
        assert len(ax.get_lines()) == 2 * 17  # the 16×16 grid
        corners = sorted(int(t.get_text()) for t in ax.texts)
        assert corners == [s.start, s.start + 15, s.start + 240, s.start + 255]
