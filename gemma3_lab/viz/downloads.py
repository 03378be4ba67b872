"""Lossless downloads of what a view shows: a matplotlib figure as PNG and SVG (text kept as
text), a table as CSV with numbers written so they read back exactly."""

from __future__ import annotations

import csv
import io

from gemma3_lab.errors import Gemma3LabError


def figure_downloads(fig, dpi: float | None = None) -> tuple[bytes, bytes]:
    """(png_bytes, svg_bytes) of a matplotlib figure. The PNG holds exactly the pixels the Agg
    canvas draws at `dpi` (default: the figure's own); the SVG keeps labels as <text> (searchable,
    any size) and carries no date, so the same figure gives the same bytes."""
    # deferred: matplotlib only when a figure is saved
    import matplotlib

    dpi = fig.dpi if dpi is None else dpi
    png, svg = io.BytesIO(), io.BytesIO()
    fig.savefig(png, format="png", dpi=dpi)
    with matplotlib.rc_context({"svg.fonttype": "none", "svg.hashsalt": "gemma3_lab"}):
        fig.savefig(svg, format="svg", metadata={"Date": None})
    return png.getvalue(), svg.getvalue()


def table_csv(rows, header) -> str:
    """The rows as CSV under `header` (RFC 4180 quoting, so commas, quotes and newlines inside a
    token survive). Floats are written as Python's shortest exact form: float(cell) == value."""
    header = list(header)
    out = io.StringIO()
    w = csv.writer(out)
    w.writerow(header)
    for i, row in enumerate(rows):
        row = list(row)
        if len(row) != len(header):
            raise Gemma3LabError(f"table row {i} has {len(row)} cells, the header {len(header)}")
        w.writerow([repr(c) if isinstance(c, float) else c for c in row])
    return out.getvalue()
