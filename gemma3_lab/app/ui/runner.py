"""Runs the library's `generate` for the two columns and streams its steps to the page.

Each generation runs in a worker thread under its model's lock; `on_token` hands every
`Step` to a queue that the Gradio generator drains, and `should_stop` is the session's stop
flag (or the page going away). Nothing here computes model outputs: every number comes
from `gemma3_lab.generate`. The capture the views read does not slow the decoding: with no
intervention the steps take the lean step, and the generated tokens are recorded in one
forward after the last (`generate.capture_fed`).
"""

from __future__ import annotations

import ctypes
import gc
import queue
import threading
import time
from dataclasses import replace
from typing import Iterator

from gemma3_lab.app.ui.capture_store import BUDGET_ENV, NAMES, estimate_bytes, from_result, session_budget
from gemma3_lab.app.ui.registry import ModelRegistry
from gemma3_lab.app.ui.session import COLUMNS, ColumnRun, Session
from gemma3_lab.app.ui.settings import LIMIT_ENV, ColumnSpec, SettingsError, prompt_token_limit
from gemma3_lab.errors import Gemma3LabError
from gemma3_lab.generate import check_length
from gemma3_lab.generate_batch import RowSettings, generate_batch
from gemma3_lab.prompt.inputs import Inputs
from gemma3_lab.viz.common import token_labels

POLL_S = 0.1
RELEASE_AFTER_S = 1.0  # seconds after a generation ends that its freed memory goes back to the system
THUMBNAIL = 1024  # longest side of a picture the Images tab keeps after the request


class ColumnError(SettingsError):
    """A column's setting that does not fit its model (context, images, heads...); `column` names it."""

    def __init__(self, column: str, problem: str) -> None:
        super().__init__(f"column {column}: {problem}")
        self.column = column
        self.problem = problem


def text_only(column: str, model_name: str, folders: bool) -> str:
    """What to do in the page when images meet a text-only model (the library's own message
    speaks to Python users: it suggests `gl.load`)."""
    other = " (or a multimodal model folder)" if folders else ""
    return (f"{model_name} is a text-only model and cannot read the uploaded image(s): choose "
            f"\"demo-multimodal\"{other} in column {column}'s model box, or remove the images")


def prepare(registry: ModelRegistry, session: Session, specs: list[ColumnSpec], prompt, images,
            max_prompt: int | None = None) -> Iterator[str]:
    """Load both models and process the prompt for each, yielding progress lines; any
    problem raises ColumnError before a single token is generated. Before it does, every
    column's status says what happened (the failed one why, the other that it was not run)
    and one more line is yielded, so the page never keeps an earlier "loading…"."""
    max_prompt = max_prompt or prompt_token_limit()
    session.stop.clear()
    session.prompt = prompt  # the pictures stay in the runs' inputs only, as thumbnails once done
    session.runs = {s.name: ColumnRun(s) for s in specs}
    try:
        yield from _prepare(registry, session, specs, prompt, images, max_prompt)
    except ColumnError as e:
        for col, run in session.runs.items():
            if col == e.column:
                run.error = e.problem
                run.status = f"not run: {e.problem}"
            else:
                run.status = f"not run: column {e.column} could not start (see its status)"
        yield f"column {e.column}: {e.problem}"
        raise


def _prepare(registry: ModelRegistry, session: Session, specs: list[ColumnSpec], prompt, images,
             max_prompt: int) -> Iterator[str]:
    for spec in specs:
        run = session.runs[spec.name]
        if not registry.is_loaded(spec.model):
            run.status = f"loading {spec.model} (first use: this takes a while)…"
            yield f"column {spec.name}: loading model {spec.model}…"
        try:
            entry = registry.get(spec.model)
        except Exception as e:  # a broken folder must not take the app down
            raise ColumnError(spec.name, f"could not load {spec.model}: {e}") from e
        model = entry.model
        run.describe = model.describe()  # names the quantization, if any
        if images and not model.config.is_multimodal:
            raise ColumnError(spec.name, text_only(spec.name, model.config.name, registry.root is not None))
        try:
            run.inputs = model.processor(prompt, images=images or None, pan_and_scan=spec.pan_and_scan)
        except (ValueError, TypeError, FileNotFoundError) as e:
            raise ColumnError(spec.name, str(e)) from None
        try:
            check_length(model.config, run.n_prompt, spec.decoding.max_new_tokens, max_prompt, "this app's limit",
                         f" (set by the server: {LIMIT_ENV}); shorten it")
        except Gemma3LabError as e:
            raise ColumnError(spec.name, str(e)) from None
        run.prompt_pieces = token_labels(model.tokenizer, run.inputs.input_ids, model.config, run.inputs.image_spans)
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
            raise ColumnError(spec.name, str(e)) from None
        run.status = f"ready: {run.n_prompt} prompt tokens"
    yield "ready"


def run_all(registry: ModelRegistry, session: Session) -> Iterator[None]:
    """Both columns at once: one batch of two when they use the same model and precision
    (`gemma3_lab.generate_batch`), else one worker per model, so both stream from the start."""
    runs = [session.runs[c] for c in COLUMNS if c in session.runs]
    events: queue.Queue = queue.Queue()
    gone = threading.Event()  # the page closed or the request was cancelled

    def stop() -> bool:
        return session.stop.is_set() or gone.is_set()

    groups: dict = {}
    for run in runs:
        groups.setdefault(run.spec.model, []).append(run)
    capture = _fits_budget(registry, runs)
    _release.generation_starts()
    workers = [threading.Thread(target=_work, args=(registry, group, events, stop, capture), daemon=True,
                                name=f"generate-{''.join(r.spec.name for r in group)}") for group in groups.values()]
    t0 = time.perf_counter()
    for w, group in zip(workers, groups.values()):
        busy = registry.get(group[0].spec.model).lock_busy()
        for run in group:
            run.status = ("waiting for the model (another request is using it)…" if busy
                          else f"processing the prompt ({run.n_prompt} tokens)…")
        w.start()
    try:
        yield  # inside: a page closed at this first update still ends the generation's count
        while any(w.is_alive() for w in workers) or not events.empty():
            got = _drain(events, POLL_S)
            for kind, col, value in got:
                _apply(session.runs[col], kind, value, time.perf_counter() - t0)
            if got:
                yield
        for w in workers:
            w.join()
    finally:
        gone.set()
        _release.generation_ends()
    yield


def _work(registry: ModelRegistry, runs: list[ColumnRun], events: queue.Queue, stop, capture: bool) -> None:
    """Generate the runs that share one model, as one batch, under that model's lock."""
    entry = registry.get(runs[0].spec.model)
    cols = [r.spec.name for r in runs]
    try:
        with entry.lock:
            for col in cols:
                events.put(("started", col, None))
            rows = [RowSettings(**r.spec.decoding.kwargs(), hooks=tuple(r.hooks)) for r in runs]
            results = generate_batch(entry.model, runs[0].inputs, rows, should_stop=stop,
                                     on_token=lambda i, step: events.put(("step", cols[i], step)),
                                     capture=NAMES if capture else None)
            for col, res in zip(cols, results):
                kept = from_result(res, entry.model.config) if capture and res.steps else None
                events.put(("done", col, (res, kept)))
    except Exception as e:  # shown in the column; the app keeps serving
        for col in cols:
            events.put(("error", col, e))


def _apply(run: ColumnRun, kind: str, value, seconds: float) -> None:
    if kind == "started":
        run.status = f"processing the prompt ({run.n_prompt} tokens)…"
    elif kind == "step":
        run.steps.append(value)
        run.status = f"generating… {len(run.steps)} tokens"
    elif kind == "error":
        run.error = f"{type(value).__name__}: {value}"
        run.status = f"failed: {run.error}"
        run.inputs, run.hooks = lighten(run.inputs), []
    else:
        res, run.capture = value
        run.result = res = replace(res, captures={})  # the compact capture replaces the raw one
        run.steps = list(res.steps)
        # the views read the capture: the pixels and the hooks (a patch's source) go with the request
        run.inputs, run.hooks = lighten(run.inputs), []
        run.capture_note = run.capture_note or "stopped before its first token"
        run.status = _summary(res, seconds) + ("" if run.capture is not None else f"; {run.capture_note}")


def _fits_budget(registry: ModelRegistry, runs: list[ColumnRun]) -> bool:
    """Whether both columns' captures fit the session budget; if not, each run says why."""
    need = sum(estimate_bytes(registry.get(r.spec.model).model.config, r.n_prompt + r.spec.decoding.max_new_tokens)
               for r in runs)
    budget = session_budget()
    if need <= budget:
        return True
    for r in runs:
        r.capture_note = (f"not captured for the inspector: {need / 2**20:.0f} MB needed, past this session's "
                          f"{budget / 2**20:.0f} MB ({BUDGET_ENV})")
    return False


def lighten(x: Inputs) -> Inputs:
    """The processed prompt as the views keep it: no pixel tensor, each picture a thumbnail
    (crop boxes scaled to it), so an upload's decoded pixels leave with the request."""
    if not x.images:
        return replace(x, pixel_values=None)
    thumbs, scales = [], []
    for img in x.images:
        scale = min(1.0, THUMBNAIL / max(img.size))
        thumbs.append(img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))))
                      if scale < 1 else img)
        scales.append(scale)
    spans = [s if s.box is None else replace(s, box=tuple(round(v * scales[s.image]) for v in s.box))
             for s in x.image_spans]
    return replace(x, pixel_values=None, images=thumbs, image_spans=spans)


class _Release:
    """When `release_memory` runs: RELEASE_AFTER_S after the last generation in the process ends
    (after the page has its last update), and never while one runs. A full collection holds
    the interpreter ~0.3 s and a trim makes the next allocations fault their pages in again,
    so a release timed from the previous generation must not land in the middle of the next
    one (a second Generate pressed within the second). Measured on the Xeon with requests back
    to back: Generate both's batch decoded at 8.9-10.6 tok/s this way, 8.3-9.4 before; within
    this VM's noise, but no stall by design."""

    def __init__(self) -> None:
        self.lock, self.running, self.timer = threading.Lock(), 0, None

    def generation_starts(self) -> None:
        with self.lock:
            self.running += 1
            if self.timer is not None:
                self.timer.cancel()
                self.timer = None

    def generation_ends(self) -> None:
        with self.lock:
            self.running -= 1
            if self.running == 0:
                self.timer = threading.Timer(RELEASE_AFTER_S, self._fire)
                self.timer.daemon = True
                self.timer.start()

    def _fire(self) -> None:
        with self.lock:
            if self.running or self.timer is None:  # a generation began as the timer fired
                return
            self.timer = None
        release_memory()


_release = _Release()


def release_memory() -> None:
    """Hand freed memory back to the system: a long prompt's activations are freed by Python
    but glibc keeps the pages unless asked (the server's RSS would stay at its peak)."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to trim
        pass


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
    speed = f", {rate:.1f} tok/s (decode step: {res.decode_path})" if rate == rate else ""
    return (f"{len(res.steps)} tokens ({why.get(res.stop_reason, res.stop_reason)}); prompt "
            f"{len(res.prompt_ids)} tokens, prefill {res.prefill_seconds:.2f} s{speed}; {seconds:.1f} s in all")
