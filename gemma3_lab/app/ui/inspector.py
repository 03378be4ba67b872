"""What the inspector shows for one generated token: its top-k candidates (recorded by
`generate`), where the query that produced it attended, and that layer's mask.

The token at step i (sequence position p) was chosen from the logits at query p - 1, so
attention is read from row p - 1 of one forward over the prompt plus the generated
tokens, run with the column's intervention hooks, through `run_with_cache`.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from gemma3_lab.app.ui.registry import ModelRegistry
from gemma3_lab.app.ui.session import ColumnRun, Session
from gemma3_lab.instrument.hooks import act_name
from gemma3_lab.prompt.inputs import Inputs
from gemma3_lab.viz.common import dense, token_labels

KEEP_LAYERS = 4  # activation caches kept per column (one forward each)
LENS_SPAN = 8  # positions the logit-lens picture shows, ending at the inspected one
ALL_HEADS = -1  # head choice: the heatmap shows every head, the table their mean


@dataclass
class Inspection:
    col: str
    index: int
    layer: int
    head: int  # ALL_HEADS or a head index
    header: str  # markdown
    top_k: list[list]  # [[piece, id, probability], ...] as recorded by generate
    cache: object  # ActivationCache: the layer's hook_pattern and hook_mask over `inputs`
    inputs: Inputs  # prompt + generated tokens, as run
    mask: torch.Tensor  # (S, T) bool, the mask the layer used
    labels: list[str]  # one per position
    query: int  # the row that produced the token
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


def layer_cache(registry: ModelRegistry, run: ColumnRun, layer: int):
    """run_with_cache of one layer's pattern and mask over the sequence, with the column's hooks."""
    if layer in run.caches:
        return run.caches[layer]
    entry = registry.get(run.spec.model)
    names = [act_name("pattern", layer), act_name("mask", layer)]
    with entry.lock, entry.model.hooks(run.hooks):
        _, cache = entry.model.run_with_cache(sequence_inputs(run), names_filter=names)
    if len(run.caches) >= KEEP_LAYERS:
        run.caches.pop(next(iter(run.caches)))
    run.caches[layer] = cache
    return cache


def lens_at(registry: ModelRegistry, run: ColumnRun, query: int, k: int = 3):
    """`gemma3_lab.instrument.lens` over the positions up to `query` (the last LENS_SPAN of them): the
    residual after every layer read through the final norm and unembedding."""
    key = ("lens", query)
    if key not in run.caches:
        entry = registry.get(run.spec.model)
        positions = list(range(max(0, query - LENS_SPAN + 1), query + 1))
        names = ["blocks.0.hook_resid_pre", "blocks.*.hook_resid_post"]
        with entry.lock, entry.model.hooks(run.hooks):
            _, cache = entry.model.run_with_cache(sequence_inputs(run, upto=query - run.n_prompt + 1),
                                                  names_filter=names, positions=positions, top_k=0,
                                                  return_logits=False)
            lens = cache.logit_lens(k=k)
        if len(run.caches) >= KEEP_LAYERS:
            run.caches.pop(next(iter(run.caches)))
        run.caches[key] = lens
    return run.caches[key]


def lens_rows(lens) -> list[list]:
    """[[layer, top-1, p, top-2, p, top-3, p], ...] at the last (inspected) position."""
    rows = []
    for r, label in enumerate(lens.layer_labels):
        row = [label]
        for rank in range(lens.top_probs.shape[-1]):
            row += [lens.top_tokens[r][-1][rank], round(float(lens.top_probs[r, -1, rank]), 4)]
        rows.append(row)
    return rows


def topk_rows(step) -> list[list]:
    return [[piece, int(i), float(p)] for (piece, p), i in zip(step.top_k, step.top_k_ids)]


def inspect_token(registry: ModelRegistry, session: Session, col: str, index, layer, head) -> Inspection:
    run = session.run(col)
    if not run.steps:
        raise LookupError(f"column {col} has no generated tokens to inspect")
    index = whole("token index", index)
    if not 0 <= index < len(run.steps):
        raise LookupError(f"column {col} has {len(run.steps)} generated tokens; there is no token {index}")
    if run.result is None:
        raise LookupError(f"column {col} is still generating: inspect its tokens when it has finished")
    model = registry.get(run.spec.model).model
    cfg = model.config.text
    layer = whole("layer", layer)
    if not 0 <= layer < cfg.num_layers:
        raise LookupError(f"layer {layer} does not exist: {model.config.name} has layers 0–{cfg.num_layers - 1}")
    head = ALL_HEADS if head is None else whole("head", head)
    if not (head == ALL_HEADS or 0 <= head < cfg.num_heads):
        raise LookupError(f"head {head} does not exist: layer {layer} has heads 0–{cfg.num_heads - 1}")
    step = run.steps[index]
    cache = layer_cache(registry, run, layer)
    pattern = dense(cache["pattern", layer])[0].float()  # (N, S, T)
    mask = cache["mask", layer][0, 0]  # (S, T)
    x = sequence_inputs(run)
    labels = token_labels(model.tokenizer, x.input_ids, model.config, x.image_spans)
    query = step.position - 1
    row = pattern[:, query] if head == ALL_HEADS else pattern[head, query][None]
    weights = row.mean(0)[: query + 1]
    top = torch.topk(weights, min(8, query + 1))
    attended = [[int(j), labels[int(j)], round(float(w), 4)] for w, j in zip(top.values, top.indices)]
    kind = cfg.layer_types[layer].short
    header = (
        f"**column {col}, step {index}**: token {step.token!r} (id {step.token_id}) at position {step.position}, "
        f"p = {step.prob:.4f} (log p = {step.logprob:.3f}). It was chosen from the logits at position {query} "
        f"({labels[query]!r}); attention below is that query's, layer {layer} ({kind}"
        + (f", window {cfg.sliding_window}" if kind != "global" else "") + ")"
        + (f", all {cfg.num_heads} heads (the table: their mean)." if head == ALL_HEADS else f", head {head}.")
    )
    return Inspection(col, index, layer, head, header, topk_rows(step), cache, x, mask, labels, query, attended,
                      kind, cfg.window_for(cfg.layer_types[layer]))


def whole(what: str, value) -> int:
    try:
        x = float(value)
    except (TypeError, ValueError):
        raise LookupError(f"{what} must be a whole number, not {value!r}") from None
    if x != int(x):
        raise LookupError(f"{what} must be a whole number, not {value!r}")
    return int(x)
