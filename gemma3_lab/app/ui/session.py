"""Per-browser-session state: the two columns' runs, the stop flag and the inspector's
activation caches. Gradio keeps one `Session` per browser tab; models are never stored here."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

from gemma3_lab.app.ui.capture_store import ColumnCapture
from gemma3_lab.app.ui.settings import ColumnSpec
from gemma3_lab.generate import GenerationResult, Step
from gemma3_lab.prompt.inputs import Inputs

COLUMNS = ("A", "B")


@dataclass
class ColumnRun:
    spec: ColumnSpec
    describe: str = ""  # the model's describe() line
    inputs: Inputs | None = None  # the processed prompt
    steps: list[Step] = field(default_factory=list)  # filled while streaming
    result: GenerationResult | None = None  # set when the generation ends
    status: str = "waiting"
    error: str | None = None
    hooks: list = field(default_factory=list)  # (name, fn) pairs the generation ran with
    capture: ColumnCapture | None = None  # what every view reads, set when the generation ends
    capture_note: str = ""  # why there is no capture (the session's budget), if so
    prompt_pieces: list[str] | None = None  # one label per prompt slot, for the token strip

    @property
    def n_prompt(self) -> int:
        return 0 if self.inputs is None else int(self.inputs.input_ids.shape[1])


class Session:
    """One browser tab's state. A fresh copy per tab: `gr.State(Session)` calls the class,
    and deep copies (Gradio makes them) start empty rather than sharing locks or results."""

    def __init__(self) -> None:
        self.stop = threading.Event()
        self.runs: dict[str, ColumnRun] = {}
        self.prompt = None
        self.busy = threading.Lock()  # held by the generation running now
        self.generation = 0  # counts Generate presses: a newer one replaces the running one
        self.settings: dict | None = None  # the generate fields of the runs shown (what a saved session holds)
        self.downloads = None  # this tab's folder of figure and table downloads, made on first use

    def __deepcopy__(self, memo) -> "Session":
        return Session()

    def run(self, col: str) -> ColumnRun:
        if col not in self.runs:
            raise LookupError(f"column {col} has not generated anything yet: press Generate first")
        return self.runs[col]

    def first_divergence(self) -> int | None:
        """Index of the first step where A and B chose different tokens (from the library)."""
        a, b = self.runs.get("A"), self.runs.get("B")
        if a is None or b is None or a.result is None or b.result is None:
            return None
        return a.result.first_divergence(b.result)
