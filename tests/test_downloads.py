"""Figure and table downloads (gemma3_lab/viz/downloads.py): the PNG is the canvas's own pixels,
the SVG keeps its labels as text and is the same bytes twice, the CSV reads back exactly."""

from __future__ import annotations

import csv
import io
import xml.etree.ElementTree as ET

import matplotlib
import numpy as np
import pytest
from PIL import Image

from gemma3_lab.errors import Gemma3LabError
from gemma3_lab.viz.downloads import figure_downloads, table_csv

matplotlib.use("Agg")


@pytest.fixture
def fig():
    import matplotlib.pyplot as plt

    f, ax = plt.subplots(figsize=(4, 3), dpi=80)
    ax.imshow(np.random.default_rng(0).random((6, 6)), cmap="viridis")
    ax.set_title("layer 5 · head 2 ▁Paris")
    yield f
    plt.close(f)


def test_the_png_is_the_canvas_pixels(fig):
    png, _ = figure_downloads(fig)
    fig.canvas.draw()
    drawn = np.asarray(fig.canvas.buffer_rgba())
    with Image.open(io.BytesIO(png)) as im:
        assert im.format == "PNG" and im.size == (320, 240)
        assert np.array_equal(np.asarray(im.convert("RGBA")), drawn)
    big, _ = figure_downloads(fig, dpi=160)
    assert Image.open(io.BytesIO(big)).size == (640, 480)


def test_the_svg_keeps_text_and_is_reproducible(fig):
    _, svg = figure_downloads(fig)
    root = ET.fromstring(svg)
    texts = ["".join(t.itertext()) for t in root.iter("{http://www.w3.org/2000/svg}text")]
    assert "layer 5 · head 2 ▁Paris" in texts
    assert figure_downloads(fig)[1] == svg


def test_the_csv_reads_back_exactly():
    rows = [[0, "▁Paris", 0.1 + 0.2], [1, 'a "quoted", comma', 1e-300], [2, "line\nbreak", float("inf")]]
    text = table_csv(rows, ["slot", "token", "p"])
    back = list(csv.reader(io.StringIO(text)))
    assert back[0] == ["slot", "token", "p"]
    for (i, tok, p), (ci, ctok, cp) in zip(rows, back[1:]):
        assert int(ci) == i and ctok == tok and float(cp) == p


def test_a_ragged_row_is_named():
    with pytest.raises(Gemma3LabError, match="table row 1 has 2 cells, the header 3"):
        table_csv([[1, 2, 3], [1, 2]], ["a", "b", "c"])
