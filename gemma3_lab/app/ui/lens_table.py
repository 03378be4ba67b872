"""The logit-lens table over every slot of a column's sequence: an explicit action, since it
costs one pass over the 262k-row head per (slot, layer). A look computes the lens at the
inspected slot only (19 head rows); this fills the rest, `LENS_CHUNK` slots at a time, with
a status line after each chunk, and keeps every slot in the capture (`ColumnCapture.lenses`),
so the table, later looks and a saved session read it without computing it again.
"""

from __future__ import annotations

import time

import gradio as gr

from gemma3_lab.app.ui.capture_store import LENS_CHUNK
from gemma3_lab.app.ui.checks import TOAST_SECONDS
from gemma3_lab.app.ui.inspect_views import lens_view_value
from gemma3_lab.app.ui.inspector import captured
from gemma3_lab.app.ui.registry import ModelRegistry
from gemma3_lab.app.ui.session import COLUMNS, Session

BUTTON = "Fill the lens table: every slot"


def progress_line(col: str, done: int, todo: int, seconds: float, rows_per_slot: int) -> str:
    left = seconds / done * (todo - done) if done else float("nan")
    return (f"column {col}: logit lens at {done} of {todo} slots ({done * rows_per_slot:,} head rows) in "
            f"{seconds:.0f} s; about {left:.0f} s left")


def make_lens_everywhere(registry: ModelRegistry):
    def logit_lens_all(column, session: Session):
        """The logit lens of column "A" or "B" at every slot × every layer, read off its capture
        (no forward): a status line after each chunk of slots, then the whole table."""
        col = column or "A"
        try:
            if col not in COLUMNS:
                raise LookupError(f"column must be A or B, not {col!r}")
            run = session.run(col)
            cap = captured(run, col)
            model = registry.get(run.spec.model).model
        except LookupError as e:
            raise gr.Error(str(e.args[0] if e.args else e), duration=TOAST_SECONDS) from None
        todo = [p for p in range(cap.length) if p not in cap.lenses]
        rows = cap.resid.shape[0]
        t0 = time.perf_counter()
        for c in range(0, len(todo), LENS_CHUNK):
            cap.compute_lens(model, todo[c: c + LENS_CHUNK])
            yield gr.skip(), progress_line(col, min(c + LENS_CHUNK, len(todo)), len(todo),
                                           time.perf_counter() - t0, rows)
        lens = cap.lens(model, list(range(cap.length)))
        yield (lens_view_value(lens),
               f"column {col}: the logit lens at all {cap.length} slots × {rows} layers (the embedding and every "
               f"block); {len(todo)} slots computed now in {time.perf_counter() - t0:.1f} s")

    return logit_lens_all


def wire_lens_table(w: dict, registry: ModelRegistry, session: gr.State) -> None:
    fill = w["lens_all"].click(make_lens_everywhere(registry), inputs=[w["column"], session],
                               outputs=[w["lens_view"], w["lens_status"]], api_name="logit_lens_all",
                               concurrency_id="lens", show_progress="minimal",  # looks go on meanwhile
                               show_progress_on=[w["lens_status"]])
    # a stopped fill keeps the slots it computed: the next look or fill reads them
    w["lens_stop"].click(None, cancels=[fill], api_visibility="private")
