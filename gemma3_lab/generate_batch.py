"""Several generations from one prompt decoded as one batch: each row has its own decoding
(sampling, seed, length), its own interventions and its own stop, and comes back as the
`GenerationResult` a single `generate` would give.

Rows share the prompt, so no padding is needed; with no hooks in any row the prompt is run
once and its cache repeated per row. Every decode step is one forward of all rows, which
on a weight-bound decoder costs about as much as one row.
"""

from __future__ import annotations

import time
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Callable

import torch

from gemma3_lab.errors import Gemma3LabError
from gemma3_lab.generate import (
    PREFILL_CHUNK,
    GenerationResult,
    Step,
    _prompt_inputs,
    capture_fed,
    check_length,
    decode_rows,
    prefill_rows,
    record_step,
    sample_next,
    watch_prefill,
)
from gemma3_lab.instrument.capture import Capture, capture_hooks, row_captures
from gemma3_lab.instrument.interventions import for_row
from gemma3_lab.model.kv_cache import KVCache
from gemma3_lab.prompt.inputs import Inputs


@dataclass(frozen=True)
class RowSettings:
    """One row's decoding (as `generate`'s keywords) and its interventions (hook pairs that
    see this row only)."""

    max_new_tokens: int = 64
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None
    hooks: tuple = ()


@dataclass
class _Row:
    settings: RowSettings
    generator: torch.Generator | None
    ids: list
    steps: list
    text: str = ""
    reason: str | None = None  # set when the row has stopped


@torch.no_grad()
def generate_batch(
    model,
    prompt,
    rows: list[RowSettings],
    images=None,
    on_token: Callable[[int, Step], None] | None = None,
    capture=None,
    record_top_k: int = 5,
    stop_ids: tuple[int, ...] | None = None,
    pan_and_scan: bool = False,
    should_stop: Callable[[], bool] | None = None,
    prefill_chunk: int | None = PREFILL_CHUNK,
    fast: bool | None = None,
) -> list[GenerationResult]:
    """One `GenerationResult` per row of `rows`, all decoded together from `prompt`.

    `on_token(row, step)` streams each row's steps; `should_stop()` ends every row (polled
    between steps and prefill chunks); `capture` and `fast` are `generate`'s, the captures
    split per row. With no row hooked, the rows' steps take the lean step together.
    """
    inputs = _checked(model, prompt, rows, images, pan_and_scan)
    n_prompt, R = inputs.input_ids.shape[1], len(rows)
    stop_ids = tuple(stop_ids if stop_ids is not None else model.config.text.eos_token_ids)
    state = [_Row(s, torch.Generator().manual_seed(s.seed) if s.seed is not None else None, [], []) for s in rows]
    hooks = [pair for r, s in enumerate(rows) for pair in for_row(list(s.hooks), r)]
    # with no hooks every row's prompt forward is the same: run it once, repeat its cache
    shared = not hooks
    cache = KVCache(model.config.text)
    captures: dict[str, Capture] = {}
    t0 = time.perf_counter()
    prompt_cache = None  # kept where the steps run unrecorded (see `watch_prefill`)
    with model.hooks(hooks), ExitStack() as watching:
        watching.enter_context(model.hooks(capture_hooks(model, capture, captures)))
        logits = prefill_rows(model, inputs if shared else _repeat(inputs, R), cache, prefill_chunk, should_stop)
        if logits is not None:
            prompt_cache = watch_prefill(model, capture, captures, cache, fast, watching)
        if shared and logits is not None:
            cache.repeat_rows(R)
            logits = logits.expand(R, -1)
        t_first = time.perf_counter()
        if logits is None:
            for row in state:
                row.reason = "stopped"
        i = 0
        while any(row.reason is None for row in state):
            for r, row in enumerate(state):
                if row.reason is None:
                    _choose(model, row, r, logits[r], i, n_prompt, record_top_k, stop_ids, on_token)
            if should_stop is not None and should_stop():
                for row in state:
                    row.reason = row.reason or "stopped"
            i += 1
            if any(row.reason is None for row in state):
                # a finished row is fed its last token again: its results no longer change
                logits = decode_rows(model, [row.ids[-1] for row in state], cache, fast)
    t_end = time.perf_counter()
    # every step is one forward of all rows; several rows never take the compiled step, and the
    # lean one applies to every step or to none (nothing is hooked in between)
    path = max(cache.paths, key=cache.paths.get) if cache.paths else None
    return [
        GenerationResult(
            text=row.text, token_ids=row.ids, steps=row.steps, prompt_ids=inputs.input_ids[0].tolist(),
            stop_reason=row.reason, inputs=inputs, prefill_seconds=t_first - t0, decode_seconds=t_end - t_first,
            captures=(row_captures(captures, r, n_prompt + max(len(row.ids) - 1, 0)) if prompt_cache is None
                      else capture_fed(model, capture, captures, prompt_cache.copy(), row.ids[:-1], prefill_chunk)),
            decode_paths=(dict(cache.paths) if R == 1 else {path: len(row.ids) - 1}) if len(row.ids) > 1 else {},
        )
        for r, row in enumerate(state)
    ]


def _checked(model, prompt, rows: list[RowSettings], images, pan_and_scan: bool):
    """The prompt as one row of Inputs, with room in the context for every row's new tokens."""
    if not rows:
        raise Gemma3LabError("generate_batch needs at least one row")
    inputs = _prompt_inputs(model, prompt, images, pan_and_scan)
    if inputs.input_ids.shape[0] != 1:
        raise Gemma3LabError("generate_batch takes one prompt (its rows differ in decoding and hooks)")
    for r, s in enumerate(rows):
        if s.max_new_tokens < 0:
            raise Gemma3LabError(f"row {r}: max_new_tokens must be >= 0, got {s.max_new_tokens}")
        try:
            check_length(model.config, inputs.input_ids.shape[1], s.max_new_tokens)
        except Gemma3LabError as e:
            raise Gemma3LabError(f"row {r}: {e}") from None
    return inputs


def _choose(model, row: _Row, r: int, logits, i: int, n_prompt: int, record_top_k: int, stop_ids, on_token) -> None:
    """Row `r`'s step `i`: choose, record, stream, and decide whether the row stops."""
    s = row.settings
    if i >= s.max_new_tokens:
        row.reason = "max_new_tokens"
        return
    row.ids.append(sample_next(logits, s.do_sample, s.temperature, s.top_k, s.top_p, row.generator))
    new_text = model.tokenizer.decode(row.ids) if model.tokenizer is not None else ""
    step = record_step(model.tokenizer, row.ids, i, n_prompt + i, logits, record_top_k, new_text[len(row.text):])
    row.text = new_text
    row.steps.append(step)
    if on_token is not None:
        on_token(r, step)
    if row.ids[-1] in stop_ids:
        row.reason = "eos"
    elif i + 1 >= s.max_new_tokens:
        row.reason = "max_new_tokens"


def _repeat(x: Inputs, n: int) -> Inputs:
    """The one-row prompt as n identical rows (each image's pixels once per row, in row order)."""
    pv = None if x.pixel_values is None else torch.cat([x.pixel_values] * n)
    return Inputs(x.input_ids.expand(n, -1), x.attention_mask.expand(n, -1), x.token_types.expand(n, -1), pv,
                  x.image_spans, x.images)
