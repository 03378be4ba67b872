"""Text rendering of a `MaskSet`: one grid per panel, ■ may attend and ⬚ masked, with token
labels, the window edge, and first/last rows and columns when the prompt is wider than the
terminal. Lines are (text, style) runs, written out as plain text, ANSI colour or HTML."""

from __future__ import annotations

import html
import textwrap
import unicodedata

from gemma3_lab.viz.common import LABEL_WIDTH
from gemma3_lab.viz.maskset import ALLOWED, CUT, DIAG, IMAGE, MASKED, MaskSet, Panel

GAP = -1  # a column/row index standing for the elided ones
ON, OFF, EDGE, ELIDED = "■", "⬚", "│", "⋯"
MIN_SIDE = 4  # columns kept on each side of a gap, however narrow the terminal
ANSI = {"diag": "\033[92m", "image": "\033[93m", "cut": "\033[91m", "off": "\033[2m", "edge": "\033[96m",
        "title": "\033[1m", "note": "\033[2m"}
RESET = "\033[0m"
CSS = {"diag": "color:#1a9e3f;font-weight:bold", "image": "color:#c98a00;font-weight:bold", "cut": "color:#d33",
       "off": "color:#aaa", "edge": "color:#0aa;font-weight:bold", "title": "font-weight:bold", "note": "color:#777"}
CELL = {MASKED: (OFF, "off"), CUT: (OFF, "cut"), ALLOWED: (ON, None), IMAGE: (ON, "image"), DIAG: (ON, "diag")}

Line = list[tuple[str, str | None]]


def cell_width(s: str) -> int:
    """Terminal columns `s` takes: wide (CJK) characters two, combining marks none."""
    return sum(2 if unicodedata.east_asian_width(c) in "WF" else 0 if unicodedata.combining(c) else 1 for c in s)


def fit(label: str, width: int) -> str:
    """`label` cut with "…" and padded to exactly `width` terminal columns."""
    if cell_width(label) > width:
        out = ""
        for c in label:
            if cell_width(out + c) > width - 1:
                break
            out += c
        label = out + "…"
    return label + " " * (width - cell_width(label))


def shown_indices(n: int, prefix: int, width: int, anchors=()) -> list[int]:
    """Which rows/columns fit in `width` characters after a `prefix` (two characters each): all
    of them, or the neighbourhoods of the anchors (first and last slot, image boundaries) as
    wide as fits, each run of hidden ones standing as one GAP."""
    fit = max((width - prefix + 1) // 2, 2 * MIN_SIDE + 1)
    if n <= fit:
        return list(range(n))
    anchors = sorted({0, n - 1, *(a for a in anchors if 0 <= a < n)})
    best: list[int] | None = None
    for r in range(n):
        keep = sorted({i for a in anchors for i in range(max(0, a - r), min(n, a + r + 1))})
        idx = _with_gaps(keep)
        if len(idx) > fit:
            break
        best = idx
    if best is None:  # too many anchors for the width: first and last only
        head = (fit - 1) // 2
        return [*range(head), GAP, *range(n - (fit - 1 - head), n)]
    return best


def _with_gaps(keep: list[int]) -> list[int]:
    out: list[int] = []
    for i in keep:
        if out and i == out[-1] + 2:  # one hidden slot takes a column either way: show it
            out.append(i - 1)
        elif out and i > out[-1] + 1:
            out.append(GAP)
        out.append(i)
    return out


def _hidden_ranges(idx: list[int]) -> list[tuple[int, int]]:
    return [(idx[g - 1] + 1, idx[g + 1] - 1) for g, c in enumerate(idx) if c == GAP]


def render_lines(ms: MaskSet, width: int, color: bool) -> list[Line]:
    """Header, legend, notes, then every panel."""
    cfg = ms.config
    t = cfg.text
    n_local = len(t.local_layers)
    out: list[Line] = [[(f"Attention masks · {ms.source.name} · {ms.n_tokens} tokens · {t.num_layers} layers: "
                         f"{n_local} local, {t.num_layers - n_local} global", "title")]]
    for note in cfg.notes:
        out.append([(note, "note")])
    if ms.window_override is not None:
        out.append([(f"window {ms.window_override} set for this picture (the model's is {t.sliding_window})", "note")])
    if ms.placeholder_images:
        out.append([("no images given: grey placeholders stand in (masks depend only on where the soft tokens sit)",
                     "note")])
    for s in ms.spans():
        where = f"image {s.image}" + (f" crop {s.crop}" if s.crop else "")
        out.append([(f"{where}: {s.end - s.start} soft tokens at slots {s.start}–{s.end - 1}", "note")])
    out.append(_legend(ms, color))
    for p in ms.panels:
        out.append([])
        out += panel_lines(ms, p, width)
    return out


def _legend(ms: MaskSet, color: bool) -> Line:
    has_image = bool(ms.spans())
    has_window = any(p.window_cuts for p in ms.panels)
    if not color:
        items = [(f"{ON} may attend", None), (f"{OFF} masked", None)]
        if has_window:
            items.append((f"{EDGE} window edge (first key inside it)", None))
        if has_image:
            items.append((f"{ON} above the diagonal: soft tokens of one image see each other", None))
        return _join(items)
    items = [(f"{ON} may attend", None), (f"{OFF} masked", "off"), (f"{ON} itself", "diag")]
    if has_image:
        items.append((f"{ON} same image, both ways", "image"))
    if has_window:
        items += [(f"{OFF} cut by the window", "cut"), (f"{EDGE} window edge", "edge")]
    return _join(items)


def _join(items: Line) -> Line:
    out: Line = []
    for i, it in enumerate(items):
        if i:
            out.append(("   ", None))
        out.append(it)
    return out


def panel_lines(ms: MaskSet, p: Panel, width: int) -> list[Line]:
    """One panel: title, vertical column indices, one row per query token."""
    n = ms.n_tokens
    iw = len(str(n - 1))
    lw = min(LABEL_WIDTH, max(cell_width(lab) for lab in ms.labels))
    prefix = iw + 1 + lw + 1
    anchors = [a for sp in ms.spans() for a in (sp.start - 1, sp.start, sp.end - 1, sp.end)]
    idx = shown_indices(n, prefix, width, anchors)
    lines: list[Line] = [[(p.title, "title")]]
    if not p.window_cuts and p.window is not None:
        lines.append([(f"(all {n} tokens fit in the window: nothing is cut in this prompt)", "note")])
    if GAP in idx:
        ranges = ", ".join(f"{lo}–{hi}" if hi > lo else str(lo) for lo, hi in _hidden_ranges(idx))
        edge_note = f"; {EDGE} there: window edge" if p.window is not None and p.window_cuts else ""
        note = f"(rows and columns {ranges} hidden as {ELIDED}{edge_note}; pass width= to see more)"
        lines += [[(part, "note")] for part in textwrap.wrap(note, max(width, 40), break_on_hyphens=False)]
    for d in range(iw):  # column indices, written top to bottom
        row = " " * prefix
        for j, c in enumerate(idx):
            if j:
                row += " "
            if c == GAP:
                row += ELIDED if d == iw - 1 else " "
                continue
            row += str(c).rjust(iw)[d]
        lines.append([(row.rstrip(), None)])
    image_rows = {i for s in ms.spans() for i in range(s.start, s.end)}
    for q in idx:
        if q == GAP:
            lines.append([("⋮".rjust(iw), None)])
            continue
        label = fit(ms.labels[q], lw)
        line: Line = [(f"{str(q).rjust(iw)} ", None), (label, "image" if q in image_rows else None), (" ", None)]
        edge = q - p.window + 1 if p.window is not None else 0
        for j, c in enumerate(idx):
            if j:
                line.append((EDGE, "edge") if c == edge and edge > 0 else (" ", None))
            if c == GAP:  # the edge among the hidden columns is drawn in the gap
                line.append((EDGE, "edge") if idx[j - 1] < edge < idx[j + 1] else (ELIDED, "off"))
            else:
                line.append(CELL[int(p.classes[q, c])])
        lines.append(line)
    return lines


def _runs(line: Line) -> Line:
    """Neighbouring pieces of one style merged, so each colour is switched on once per run."""
    out: Line = []
    for t, s in line:
        if out and out[-1][1] == s:
            out[-1] = (out[-1][0] + t, s)
        else:
            out.append((t, s))
    return out


def to_text(lines: list[Line], color: bool) -> str:
    rows = []
    for line in lines:
        rows.append("".join(f"{ANSI[s]}{t}{RESET}" if color and s else t for t, s in _runs(line)).rstrip())
    return "\n".join(rows)


def to_html(lines: list[Line]) -> str:
    body = "\n".join(
        "".join(f'<span style="{CSS[s]}">{html.escape(t)}</span>' if s else html.escape(t) for t, s in _runs(line))
        for line in lines
    )
    return ('<pre style="font-family:Menlo,Consolas,\'DejaVu Sans Mono\',monospace;font-size:12px;'
            f'line-height:1.15">{body}</pre>')
