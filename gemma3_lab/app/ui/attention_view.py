"""Attention and logit lens drawn in the browser from captured numbers (as CircuitsVis and
bertviz do): Python packs the numbers once (`attention_payload`, `logit_lens_payload`), the
page's own script (static/views.js) redraws on hover, focus, click and keys with no server
request.

Numbers travel as integers in units of 10**-decimals, rounded once here from the values given
at full precision, so every probability the page prints is exactly the payload's number (and
within half a unit of the captured value). A row's keys travel from its first to its last
non-zero weight over all heads: every weight left out is exactly 0 and is shown as 0.
"""

from __future__ import annotations

import base64
import json
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from gemma3_lab.config import AttentionType
from gemma3_lab.errors import Gemma3LabError
from gemma3_lab.model.banded import PatternView
from gemma3_lab.viz.common import printable

STATIC = Path(__file__).parent / "static"
MAX_VALUES = 4_000_000  # weights shipped in one payload (2 bytes each): ~11 MB of JSON at most
TEMPLATE = '<div class="g3v-host" data-kind="${value && value.kind ? value.kind : \'\'}"></div>'


def _scale(decimals: int) -> int:
    if not 1 <= decimals <= 4:  # uint16 holds 10**4 but not 10**5
        raise Gemma3LabError(f"decimals must be 1..4, got {decimals}")
    return 10**decimals


def _type_name(t) -> str:
    if isinstance(t, AttentionType):
        return t.short
    if t in ("local", "global"):
        return t
    return AttentionType(t).short  # "sliding_attention" / "full_attention"


def _rows(pattern, layer: int, want: list[int] | None) -> tuple[np.ndarray, list[int]]:
    """(N, Q, T) float64 weights of the wanted query rows, and their absolute positions."""
    if isinstance(pattern, PatternView):
        slots = pattern.q_slots.tolist()
        if want is not None:
            missing = [p for p in want if p not in slots]
            if missing:
                raise Gemma3LabError(f"layer {layer}: no attention row for position(s) {missing[:5]}")
            pattern = pattern.select(rows=[slots.index(p) for p in want])
            slots = list(want)
        dense = pattern.dense()
    else:
        dense = torch.as_tensor(pattern)
        slots = list(range(dense.shape[-2]))
    if dense.dim() == 4:  # (B, N, S, T): the first row of the batch
        dense = dense[0]
    if dense.dim() != 3:
        raise Gemma3LabError(f"layer {layer}: a pattern is (N, S, T) or (B, N, S, T), got shape {tuple(dense.shape)}")
    if want is not None and not isinstance(pattern, PatternView):
        bad = [p for p in want if not 0 <= p < dense.shape[1]]
        if bad:
            raise Gemma3LabError(f"layer {layer}: position(s) {bad[:5]} outside the {dense.shape[1]} rows captured")
        dense, slots = dense[:, want], list(want)  # the rows first: a long sequence's full square stays compact
    return dense.detach().to("cpu", torch.float64).numpy(), slots


def _pack_layer(d: np.ndarray, scale: int) -> dict:
    """One layer's rows from first to last non-zero key (over heads), as base64 uint16 (N, total)."""
    N, Q, T = d.shape
    nz = (d != 0).any(0)  # (Q, T)
    has = nz.any(1)
    lo = np.where(has, nz.argmax(1), 0)
    hi = np.where(has, T - nz[:, ::-1].argmax(1), 0)
    cols = np.arange(T)
    keep = (cols[None] >= lo[:, None]) & (cols[None] < hi[:, None])  # (Q, T), row-major order
    q = np.rint(d[:, keep] * scale).astype("<u2")  # (N, total)
    return {"lo": lo.tolist(), "len": (hi - lo).tolist(),
            "data": base64.b64encode(np.ascontiguousarray(q).tobytes()).decode("ascii")}


def attention_payload(tokens: list[str], patterns: dict, layer_types, window: int | None,
                      query_positions: list[int] | None = None, decimals: int = 3,
                      max_values: int = MAX_VALUES, query: int | None = None, layer: int | None = None,
                      head: int | str | None = None) -> dict:
    """The attention view's JSON-able numbers.

    `tokens`: one piece per slot of the sequence (keys; a slot without an attention row, such
    as the last generated token, is shown but cannot be inspected). `patterns`: {layer: (N, S, T)
    or (B, N, S, T) tensor/array, or a captured `BandedPattern`/`BlockRows`}, rows being the
    query slots (a PatternView's own `q_slots`, else 0..S-1). `layer_types`: the model's
    `config.text.layer_types` (or "local"/"global" per layer); `window`: its sliding window.
    `query_positions`: the absolute slots to ship rows for (default: every row captured).
    `query`, `layer`, `head`: where the view opens (that slot pinned, that layer, a head or
    "all"); by default nothing is pinned, the first layer and all heads are shown.
    """
    scale = _scale(decimals)
    if not patterns:
        raise Gemma3LabError("attention_payload needs at least one layer's pattern")
    types = list(layer_types)
    layers, n_heads, positions, total = [], None, None, 0
    for i in sorted(patterns):
        if not 0 <= i < len(types):
            raise Gemma3LabError(f"layer {i} is not one of the model's {len(types)} layers")
        d, slots = _rows(patterns[i], i, query_positions)
        if d.shape[2] > len(tokens):
            raise Gemma3LabError(f"layer {i}: {d.shape[2]} key slots but only {len(tokens)} tokens given")
        if positions is not None and (slots != positions or d.shape[0] != n_heads):
            raise Gemma3LabError(f"layer {i}: its rows or heads differ from layer {layers[0]['layer']}'s")
        positions, n_heads = slots, d.shape[0]
        packed = _pack_layer(d, scale)
        total += n_heads * sum(packed["len"])  # what travels: each row from its first to last non-zero key
        if total > max_values:
            raise Gemma3LabError(f"the attention view would ship over {max_values:,} weights: pass fewer "
                                 "query_positions or layers")
        kind = _type_name(types[i])
        layers.append({"layer": i, "type": kind, "window": window if kind == "local" else None, **packed})
    if query is not None and query not in positions:
        raise Gemma3LabError(f"the view cannot open at slot {query}: no attention row shipped for it")
    if layer is not None and layer not in patterns:
        raise Gemma3LabError(f"the view cannot open at layer {layer}: its pattern was not given")
    if head is not None and head != "all" and not (isinstance(head, int) and 0 <= head < n_heads):
        raise Gemma3LabError(f"head must be \"all\" or 0..{n_heads - 1}, got {head!r}")
    return {"kind": "attention", "version": 1, "tokens": [printable(t) for t in tokens], "decimals": decimals,
            "scale": scale, "n_heads": n_heads, "positions": positions, "layers": layers,
            "query": query, "layer": layer, "head": head}


def logit_lens_payload(lens, decimals: int = 3, query: int | None = None) -> dict:
    """The lens table's JSON-able numbers from a `LogitLens` (`cache.logit_lens(k)`): rows are
    positions, columns the layer labels; each cell keeps its top-k pieces and probabilities.
    `query`, a slot shown, is marked and scrolled to."""
    scale = _scale(decimals)
    probs = lens.top_probs.detach().to("cpu", torch.float64).numpy()  # (L+1, S, k)
    pieces: dict[str, int] = {}
    ids = [[[pieces.setdefault(printable(t), len(pieces)) for t in cell] for cell in row] for row in lens.top_tokens]
    S = probs.shape[1]
    positions = lens.positions if lens.positions is not None else list(range(S))
    return {"kind": "lens", "version": 1, "layers": list(lens.layer_labels),
            "tokens": [printable(t) for t in lens.tokens], "positions": list(positions), "decimals": decimals,
            "scale": scale, "k": probs.shape[2], "pieces": list(pieces),
            "top": ids, "probs": np.rint(probs * scale).astype(int).tolist(),
            "query": positions.index(query) if query in positions else None}


@lru_cache(maxsize=1)
def _assets() -> tuple[str, str]:
    return (STATIC / "views.js").read_text(), (STATIC / "views.css").read_text()


def _component(value, elem_id: str | None, **kwargs):
    # deferred: gradio only when a page is built
    import gradio as gr

    js, css = _assets()
    # the view draws into a shadow root, so Gradio's re-render of the template (which rebuilds
    # the light DOM) never wipes it and no page style leaks in; its CSS travels with the script
    return gr.HTML(value, html_template=TEMPLATE, js_on_load=f"const VIEW_CSS = {json.dumps(css)};\n{js}",
                   css_template=".g3v-host { display: block; width: 100%; }", apply_default_css=False,
                   elem_id=elem_id, **kwargs)


def attention_view(value: dict | None = None, elem_id: str | None = None, **kwargs):
    """A `gr.HTML` drawing an `attention_payload` (update it by returning a new payload)."""
    return _component(value, elem_id, **kwargs)


def logit_lens_view(value: dict | None = None, elem_id: str | None = None, **kwargs):
    """A `gr.HTML` drawing a `logit_lens_payload` as a scrollable table."""
    return _component(value, elem_id, **kwargs)
