""""Who wrote this token?" for the inspected slot: `gemma3_lab.analysis.who_wrote` (direct
logit attribution per layer and head, integrated gradients per input token) and its two
figures from `gemma3_lab.viz.attribution`. Unlike every other look this RUNS the model (one
forward for the attribution, `steps` forward + backward passes for the integrated gradients),
so it is an explicit action, under the model's lock."""

from __future__ import annotations

import gradio as gr

from gemma3_lab.analysis.who_wrote import WhoWrote, who_wrote
from gemma3_lab.app.ui.checks import TOAST_SECONDS, number
from gemma3_lab.app.ui.figures import to_image
from gemma3_lab.app.ui.inspector import captured, query_of, sequence_inputs
from gemma3_lab.app.ui.registry import ModelRegistry
from gemma3_lab.app.ui.session import COLUMNS, Session
from gemma3_lab.errors import Gemma3LabError
from gemma3_lab.viz.attribution import input_attribution_figure, who_wrote_figure

DEFAULT_STEPS = 64  # who_wrote's own default
MAX_STEPS = 256
BUTTON = "Explain: who wrote this token? (runs the model: a forward, then integrated gradients)"
TOOLTIP = ("Direct logit attribution per layer (attention / MLP) and per head, and integrated gradients per prompt "
           "token, from gemma3_lab.analysis.who_wrote. Unlike the other views this runs the model again.")


def explain_data(w: WhoWrote) -> dict:
    """The library's numbers as it returns them, as plain lists and floats (for JSON)."""
    return {
        "position": w.position, "token": w.token, "token_str": w.token_str, "logit": w.logit, "embed": w.embed,
        "attn": w.attn.tolist(), "mlp": w.mlp.tolist(), "heads": w.heads.tolist(), "tokens": list(w.tokens),
        "input_attr": None if w.input_attr is None else w.input_attr.tolist(),
        "completeness_error": w.completeness_error, "dla_error": w.dla_error,
    }


def explain_rows(w: WhoWrote) -> list[list]:
    """[[component, attn, mlp, head 0, ..., head N-1], ...]: the embedding, then one row per layer."""
    n = w.heads.shape[1]
    rows = [["embed", w.embed, None, *([None] * n)]]
    for i in range(len(w.attn)):
        rows.append([f"L{i}", float(w.attn[i]), float(w.mlp[i]), *w.heads[i].tolist()])
    return rows


def explain_headers(n_heads: int) -> list[str]:
    return ["component", "attn", "mlp"] + [f"head {h}" for h in range(n_heads)]


def explain_token(registry: ModelRegistry, session: Session, col: str, index, position, steps=DEFAULT_STEPS,
                  input_attribution: bool = True) -> tuple[WhoWrote, object]:
    """(who_wrote at the inspected slot, the model) for generated step `index` or slot `position`."""
    run = session.run(col)
    cap = captured(run, col)
    entry = registry.get(run.spec.model)
    model = entry.model
    query, _, step = query_of(run, col, cap, model, index, position)
    x = sequence_inputs(run)
    if x.image_spans:
        raise LookupError(f"column {col}: Explain needs the image's pixels, which the app does not keep after the "
                          "generation; explain a text-only prompt (or call gemma3_lab.analysis.who_wrote in Python)")
    n = int(number("steps", steps if steps is not None else DEFAULT_STEPS, int, lo=1, hi=MAX_STEPS))
    with entry.lock:  # a generation's hooks live on the shared modules while it runs
        w = who_wrote(model, x, query, token=step.token_id, input_attribution=bool(input_attribution), steps=n)
    return w, model


def make_explain(registry: ModelRegistry):
    def explain(column, index, session: Session, position=None, steps=None, input_attribution=None):
        """Who wrote column A's or B's token at generated step `index` (or the prediction at slot
        `position`): DLA per layer / head and integrated gradients with `steps` nodes (default
        64). Runs the model."""
        if column not in COLUMNS:
            raise gr.Error(f"column must be A or B, not {column!r}", duration=TOAST_SECONDS)
        try:
            w, model = explain_token(registry, session, column, index, position, steps,
                                     True if input_attribution is None else input_attribution)
        except (LookupError, Gemma3LabError) as e:
            raise gr.Error(str(e.args[0] if e.args else e), duration=TOAST_SECONDS) from None
        ig = ("" if w.input_attr is None else
              f"; integrated gradients sum to f(x) − f(baseline) within {w.completeness_error:.2%}")
        header = (f"**Who wrote {w.token_str!r} (id {w.token}) at position {w.position}**: logit {w.logit:.4f} = "
                  f"embedding + every layer's attention and MLP (direct logit attribution, sandwich norms' scales "
                  f"frozen; off by {w.dla_error:.1e}){ig}.")
        attr_fig = None
        if w.input_attr is not None:
            attr_fig = to_image(input_attribution_figure(
                w.tokens[: w.position + 1], w.input_attr[: w.position + 1],
                title=f"input attribution (integrated gradients) of the logit of {w.token_str!r}"))
        table = {"headers": explain_headers(w.heads.shape[1]), "data": explain_rows(w)}
        return header, to_image(who_wrote_figure(w)), attr_fig, table, explain_data(w)

    return explain
