"""Runs the library's `generate` for the two columns and streams its steps to the page.

Each generation runs in a worker thread under its model's lock; `on_token` hands every
`Step` to a queue that the Gradio generator drains, and `should_stop` is the session's stop
flag (or the page going away). Nothing here computes model outputs: every number comes
from `gemma3_lab.generate`.
"""

from __future__ import annotations

import queue
import threading
import time
from typing import Iterator

from gemma3_lab.app.ui.registry import ModelRegistry
from gemma3_lab.app.ui.session import COLUMNS, ColumnRun, Session
from gemma3_lab.app.ui.settings import ColumnSpec, SettingsError

POLL_S = 0.1


class ColumnError(SettingsError):
    """A column's setting that does not fit its model (context, images, heads...)."""


def prepare(registry: ModelRegistry, session: Session, specs: list[ColumnSpec], prompt, images) -> Iterator[str]:
    """Load both models and process the prompt for each, yielding progress lines; any
    problem raises ColumnError before a single token is generated."""
    session.stop.clear()
    session.prompt, session.images = prompt, images
    session.runs = {s.name: ColumnRun(s) for s in specs}
    for spec in specs:
        run = session.runs[spec.name]
        if not registry.is_loaded(spec.model):
            run.status = f"loading {spec.model} (first use: this takes a while)…"
            yield f"column {spec.name}: loading model {spec.model}…"
        try:
            entry = registry.get(spec.model)
        except Exception as e:  # a broken folder must not take the app down
            raise ColumnError(f"column {spec.name}: could not load {spec.model}: {e}") from e
        model = entry.model
        run.describe = model.describe()  # names the quantization, if any
        try:
            run.inputs = model.processor(prompt, images=images or None, pan_and_scan=spec.pan_and_scan)
        except (ValueError, TypeError, FileNotFoundError) as e:
            raise ColumnError(f"column {spec.name}: {e}") from None
        limit = model.config.text.max_position_embeddings
        need = run.n_prompt + spec.decoding.max_new_tokens
        if need > limit:
            raise ColumnError(
                f"column {spec.name}: the prompt is {run.n_prompt} tokens; with {spec.decoding.max_new_tokens} new "
                f"tokens that is {need}, past {model.config.name}'s context of {limit} tokens"
            )
        run.status = f"ready: {run.n_prompt} prompt tokens"
    # a patch reads the other column's activations, so that column's hooks come first
    for spec in sorted(specs, key=lambda s: s.intervention is not None and s.intervention.kind.startswith("patch")):
        if spec.intervention is None:
            continue
        run = session.runs[spec.name]
        run.status = f"preparing the intervention: {spec.intervention.describe()}…"
        yield f"column {spec.name}: preparing its intervention…"
        try:
            run.hooks = spec.intervention.hooks(registry.get(spec.model).model, session, spec.name, registry)
        except (ValueError, KeyError, LookupError) as e:
            raise ColumnError(f"column {spec.name}: {e}") from None
        run.status = f"ready: {run.n_prompt} prompt tokens"
    yield "ready"


def generate_column(registry: ModelRegistry, session: Session, col: str) -> Iterator[ColumnRun]:
    """Stream one column: yields its ColumnRun whenever new steps have arrived."""
    run = session.runs[col]
    entry = registry.get(run.spec.model)
    steps: queue.Queue = queue.Queue()
    gone = threading.Event()  # the page closed or the request was cancelled
    outcome: dict = {}

    def work() -> None:
        try:
            with entry.lock, entry.model.hooks(run.hooks):
                outcome["result"] = entry.model.generate(
                    run.inputs, on_token=steps.put, should_stop=lambda: session.stop.is_set() or gone.is_set(),
                    **run.spec.decoding.kwargs(),
                )
        except Exception as e:  # shown in the column; the app keeps serving
            outcome["error"] = e

    run.status = ("waiting for the model (another request is using it)…" if entry.lock_busy()
                  else f"processing the prompt ({run.n_prompt} tokens)…")
    yield run
    worker = threading.Thread(target=work, name=f"generate-{col}", daemon=True)
    t0 = time.perf_counter()
    worker.start()
    try:
        while worker.is_alive() or not steps.empty():
            got = _drain(steps, POLL_S)
            if got:
                run.steps += got
                run.status = f"generating… {len(run.steps)} tokens"
                yield run
        worker.join()
    finally:
        gone.set()
    if "error" in outcome:
        run.error = f"{type(outcome['error']).__name__}: {outcome['error']}"
        run.status = f"failed: {run.error}"
    else:
        res = run.result = outcome["result"]
        run.steps = list(res.steps)
        run.status = _summary(res, time.perf_counter() - t0)
    yield run


def run_all(registry: ModelRegistry, session: Session) -> Iterator[ColumnRun]:
    for col in COLUMNS:
        if col in session.runs:
            yield from generate_column(registry, session, col)


def _drain(q: queue.Queue, timeout: float) -> list:
    try:
        items = [q.get(timeout=timeout)]
    except queue.Empty:
        return []
    while True:
        try:
            items.append(q.get_nowait())
        except queue.Empty:
            return items


def _summary(res, seconds: float) -> str:
    why = {"eos": "end of sequence", "max_new_tokens": "max tokens reached", "stopped": "stopped by you"}
    rate = res.tokens_per_second
    speed = f", {rate:.1f} tok/s" if rate == rate else ""
    return (f"{len(res.steps)} tokens ({why.get(res.stop_reason, res.stop_reason)}); prompt "
            f"{len(res.prompt_ids)} tokens, prefill {res.prefill_seconds:.2f} s{speed}; {seconds:.1f} s in all")
