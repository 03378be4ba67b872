"""Save the page's session to a file and load one back: the prompt, every setting of both
columns, their generations (step records, processed prompt) and their captures, written by
`gemma3_lab.analysis.session_file` so that Python reads the same file into the same result
objects. Loading restores the columns as they were; every view reads the loaded capture, so
the page shows what it showed (the model is loaded for the lens, never run to generate)."""

from __future__ import annotations

import tempfile
from dataclasses import replace
from pathlib import Path

import torch

from gemma3_lab.analysis.session_file import load_session, save_session
from gemma3_lab.app.ui.capture_store import from_result, to_captures
from gemma3_lab.app.ui.checks import SettingsError
from gemma3_lab.app.ui.columns import parse_columns
from gemma3_lab.app.ui.registry import ModelRegistry
from gemma3_lab.app.ui.session import COLUMNS, ColumnRun, Session
from gemma3_lab.errors import Gemma3LabError

APP_KEY = "app"  # the settings entry this page writes: {"generate": fields, "columns": per-column page state}
RUN_FIELDS = ("describe", "status", "error", "capture_note", "prompt_pieces")


def save(session: Session, folder: Path | None = None) -> Path:
    """The session as a .zip in a fresh temporary folder (or `folder`); SettingsError if
    there is nothing finished to save."""
    runs = {c: r for c, r in session.runs.items() if r.result is not None}
    if not runs or session.settings is None:
        raise SettingsError("nothing to save yet: press Generate and let both columns finish")
    results = {c: replace(r.result, inputs=r.inputs, captures=to_captures(r.capture) if r.capture else {})
               for c, r in runs.items()}
    state = {c: {f: getattr(r, f) for f in RUN_FIELDS} for c, r in runs.items()}
    folder = Path(folder or tempfile.mkdtemp(prefix="gemma3_lab-session-"))
    lens = {f"{c}.{k}": v for c, r in runs.items() if r.capture for k, v in r.capture.lens_arrays().items()}
    return save_session(folder / "gemma3_lab_session.zip", session.prompt,
                        {APP_KEY: {"generate": session.settings, "columns": state}}, results, lens)


def load(registry: ModelRegistry, session: Session, path) -> dict:
    """Replace the session's columns with the file's; returns the saved generate fields (to
    put back on the page). Gemma3LabError or SettingsError, one line, for a file we cannot use."""
    saved = load_session(path)
    app = saved.settings.get(APP_KEY)
    if not isinstance(app, dict) or not isinstance(app.get("generate"), dict):
        raise SettingsError(f"{Path(path).name}: not saved by this app (no {APP_KEY!r} settings); read it in "
                            "Python with gemma3_lab.analysis.session_file.load_session")
    fields = app["generate"]
    try:
        specs = {s.name: s for s in parse_columns(registry, fields)}
    except KeyError as e:
        raise SettingsError(f"{Path(path).name}: the saved settings lack field {e.args[0]!r}") from None
    runs = {}
    for col in COLUMNS:
        if col not in saved.results:
            continue
        res = saved.results[col]
        model = registry.get(specs[col].model).model
        run = ColumnRun(specs[col], inputs=res.inputs, steps=list(res.steps))
        for f, v in (app.get("columns", {}).get(col) or {}).items():
            if f in RUN_FIELDS:
                setattr(run, f, v)
        try:
            run.capture = from_result(res, model.config) if res.captures else None
            if run.capture is not None:  # the logit-lens slots computed before the save
                run.capture.restore_lens({k.split(".", 1)[1]: torch.as_tensor(v) for k, v in saved.arrays.items()
                                          if k.startswith(f"{col}.")})
        except (KeyError, IndexError, RuntimeError, ValueError) as e:
            raise Gemma3LabError(f"{Path(path).name}: column {col}'s capture does not fit {specs[col].model} "
                                 f"({type(e).__name__}: {e})") from None
        run.result = replace(res, captures={})
        runs[col] = run
    session.stop.set()  # a generation still running for this tab gives way to the loaded one
    with session.busy:
        session.runs, session.prompt, session.settings = runs, saved.prompt, fields
        session.stop.clear()
    return fields
