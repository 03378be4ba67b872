"""What the inspector shows for one slot of a column's sequence, read from the column's
capture (`capture_store`): the next-token candidates there, where that slot attended, the
layer's mask and the logit lens. The model is not run again.

Asked by generated step i (sequence position p), the slot is the query p - 1 that chose the
token, and the candidates are the ones `generate` recorded; asked by position, the slot is
that position itself (prompt included) and the candidates are read off its final residual.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from gemma3_lab.app.ui.capture_store import ColumnCapture
from gemma3_lab.app.ui.checks import ALL_HEADS, check_head, check_layer, whole
from gemma3_lab.app.ui.registry import ModelRegistry
from gemma3_lab.app.ui.session import COLUMNS, ColumnRun, Session
from gemma3_lab.generate import Step
from gemma3_lab.prompt.inputs import Inputs
from gemma3_lab.viz.common import token_labels

LENS_SPAN = 4  # slots the downloadable logit-lens figure shows, ending at the inspected one


@dataclass
class Inspection:
    col: str
    index: int | None  # the generated step, None for a prompt slot
    layer: int
    head: int  # ALL_HEADS or a head index
    header: str  # markdown
    step: Step  # the candidates at the query (recorded, or read off the capture)
    top_k: list[list]  # [[piece, id, probability], ...]
    cache: object  # ActivationCache: the layer's hook_pattern and hook_mask over `inputs`
    inputs: Inputs  # the sequence computed
    mask: torch.Tensor  # (S, T) bool, the mask the layer used
    labels: list[str]  # one per position
    query: int  # the slot inspected (the row that produced the token)
    attended: list[list]  # [[position, token, weight], ...] highest first
    layer_kind: str
    window: int | None  # the layer's sliding window, None for a global layer


def sequence_inputs(run: ColumnRun, upto: int | None = None) -> Inputs:
    """The prompt followed by the generated tokens before step `upto` (all but the last by
    default: no later query is needed), as one uncached input."""
    steps = run.steps[: (len(run.steps) - 1 if upto is None else upto)]
    x = run.inputs
    if not steps:
        return x
    new = torch.tensor([[s.token_id for s in steps]], dtype=x.input_ids.dtype)
    ones = torch.ones_like(new)
    return replace(
        x,
        input_ids=torch.cat([x.input_ids, new], 1),
        attention_mask=torch.cat([x.attention_mask, ones], 1),
        token_types=torch.cat([x.token_types, torch.zeros_like(new)], 1),
    )


def all_labels(model, run: ColumnRun) -> list[str]:
    """One label per slot of the sequence, the last generated token (never fed back) included."""
    x = sequence_inputs(run, upto=len(run.steps))
    return token_labels(model.tokenizer, x.input_ids, model.config, x.image_spans)


def captured(run: ColumnRun, col: str) -> ColumnCapture:
    """The column's capture, or a LookupError saying why there is none."""
    if run.result is None:
        raise LookupError(f"column {col} is still generating: look at its tokens when it has finished")
    if run.capture is None:
        raise LookupError(f"column {col}: this generation was {run.capture_note or 'not captured'}")
    return run.capture


def lens_rows(lens, position: int | None = None) -> list[list]:
    """[[layer, top-1, p, top-2, p, top-3, p], ...] at slot `position` (default: the last shown)."""
    i = -1 if position is None else lens.positions.index(position)
    rows = []
    for r, label in enumerate(lens.layer_labels):
        row = [label]
        for rank in range(lens.top_probs.shape[-1]):
            row += [lens.top_tokens[r][i][rank], round(float(lens.top_probs[r, i, rank]), 4)]
        rows.append(row)
    return rows


def lens_long_rows(lens) -> list[list]:
    """[[slot, token, layer, top-1, p, ...], ...]: every slot shown, every layer (the CSV of the table)."""
    return [[p, lens.tokens[i]] + row for i, p in enumerate(lens.positions) for row in lens_rows(lens, p)]


def lens_at(model, cap: ColumnCapture, query: int, k: int = 3):
    """The logit lens at `query` and at every slot computed before (a look computes one slot:
    19 head rows; `lens_everywhere` fills the rest), from the capture."""
    cap.compute_lens(model, [query])
    return cap.lens(model, cap.lens_positions, k)


def lens_span(model, cap: ColumnCapture, query: int, k: int = 3):
    """The logit lens over the LENS_SPAN slots ending at `query` (the downloadable figure)."""
    return cap.lens(model, list(range(max(0, query - LENS_SPAN + 1), query + 1)), k)


def topk_rows(step) -> list[list]:
    return [[piece, int(i), float(p)] for (piece, p), i in zip(step.top_k, step.top_k_ids)]


def query_of(run: ColumnRun, col: str, cap: ColumnCapture, model, index, position) -> tuple[int, int | None, Step]:
    """(query slot, step index or None, the candidates there) for a step `index` or a slot `position`."""
    if position is not None:
        p = whole("position", position)
        if not 0 <= p < cap.length:
            raise LookupError(f"column {col} computed slots 0–{cap.length - 1}; there is no position {p} (the last "
                              "generated token is never fed back)")
        nxt = int(cap.input_ids[0, p + 1]) if p + 1 < cap.length else None
        if nxt is None:
            nxt = run.steps[-1].token_id if run.steps else cap.next_token(model, p, 1)[0][0][0]
        top, logp = cap.next_token(model, p, len(run.steps[0].top_k) if run.steps else 5, also=nxt)
        piece = model.tokenizer.id_to_token
        step = Step(-1, p + 1, nxt, piece(nxt), "", logp, [(piece(i), q) for i, q in top], [i for i, _ in top])
        return p, None, step
    if index is None:
        raise LookupError("which token? give its index (0 = the first generated token) or a position")
    i = whole("token index", index)
    if not 0 <= i < len(run.steps):
        raise LookupError(f"column {col} has {len(run.steps)} generated tokens; there is no token {i}")
    return run.steps[i].position - 1, i, run.steps[i]


def inspect_token(registry: ModelRegistry, session: Session, col: str, index, layer, head,
                  position=None) -> Inspection:
    run = session.run(col)
    if not run.steps and position is None:
        raise LookupError(f"column {col} has no generated tokens to inspect")
    cap = captured(run, col)
    model = registry.get(run.spec.model).model
    cfg = model.config.text
    layer = check_layer(model.config, layer)
    head = check_head(model.config, head, allow_all=True)  # ALL_HEADS: the heatmap shows every head, the table their mean
    query, index, step = query_of(run, col, cap, model, index, position)
    x = sequence_inputs(run)
    labels = token_labels(model.tokenizer, x.input_ids, model.config, x.image_spans)
    row = cap.row(layer, query)  # (N, T)
    weights = (row if head == ALL_HEADS else row[head][None]).mean(0)[: query + 1]
    top = torch.topk(weights, min(8, query + 1))
    attended = [[int(j), labels[int(j)], round(float(w), 4)] for w, j in zip(top.values, top.indices)]
    kind = cfg.layer_types[layer].short
    what = (f"step {index}**: token {step.token!r} (id {step.token_id}) at position {step.position}, "
            f"p = {step.prob:.4f} (log p = {step.logprob:.3f}). It was chosen from the logits at position {query} "
            f"({labels[query]!r})" if index is not None else
            f"position {query}** ({labels[query]!r}, {'prompt' if query < run.n_prompt else 'generated'}): the "
            f"next-token distribution the model had there")
    header = (f"**column {col}, {what}; attention below is that query's, layer {layer} ({kind}"
              + (f", window {cfg.sliding_window}" if kind != "global" else "") + ")"
              + (f", all {cfg.num_heads} heads (the table: their mean)." if head == ALL_HEADS else f", head {head}."))
    return Inspection(col, index, layer, head, header, step, topk_rows(step), cap.cache(model, [layer]), x,
                      cap.mask(layer), labels, query, attended, kind, cfg.window_for(cfg.layer_types[layer]))


def look(registry: ModelRegistry, session: Session, col: str, index, layer, head, position=None):
    """(Inspection, the column's run, its model, the logit lens there): what every inspector
    endpoint starts from; a LookupError / SettingsError / Gemma3LabError says what is wrong."""
    if col not in COLUMNS:
        raise LookupError(f"column must be A or B, not {col!r}")
    ins = inspect_token(registry, session, col, index, layer if layer is not None else 0, head, position)
    run = session.run(col)
    model = registry.get(run.spec.model).model
    return ins, run, model, lens_at(model, run.capture, ins.query)
