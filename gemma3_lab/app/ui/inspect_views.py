"""The inspector's browser-drawn views, packed from a column's capture: the attention view
(every layer, every head, hover any shipped slot) and the logit-lens table. A look ships
numbers, not pictures; the page redraws on hover, focus, keys and layer or head switches
without asking the server again.

Which query rows travel: a long sequence's every row at every layer would be tens of millions
of weights, so a look ships the inspected slot, then each generated token's query, then the
prompt slots nearest the inspected one, as long as `ROW_BUDGET` weights allow. A slot left out
still shows as a key, marked as having no row.
"""

from __future__ import annotations

from gemma3_lab.app.ui.attention_view import attention_payload, logit_lens_payload
from gemma3_lab.app.ui.capture_store import ColumnCapture
from gemma3_lab.app.ui.checks import ALL_HEADS

ROW_BUDGET = 1_500_000  # attention weights one look ships (2 bytes each before base64)


def row_cost(cfg, query: int) -> int:
    """Weights one query row ships over every layer and head (keys its mask can reach)."""
    n = 0
    for kind in cfg.layer_types:
        w = cfg.window_for(kind)
        n += cfg.num_heads * (query + 1 if w is None else min(query + 1, w))
    return n


def rows_to_ship(cfg, length: int, query: int, n_prompt: int, budget: int = ROW_BUDGET) -> list[int]:
    """The query slots a look ships, in order: `query`, the generated tokens' queries (slots
    n_prompt-1 .. length-1), then prompt slots by distance from `query`, while they fit."""
    wanted = [query] + list(range(max(n_prompt - 1, 0), length))
    wanted += sorted(range(length), key=lambda p: (abs(p - query), p))
    chosen, spent = set(), 0
    for p in wanted:
        if p in chosen:
            continue
        cost = row_cost(cfg, p)
        if spent + cost > budget and chosen:  # the inspected slot (first) always travels
            if p >= n_prompt - 1:  # a generated token's query that does not fit: the others may
                continue
            break  # the first prompt slot that does not fit ends them: the rest stay one run around the query
        chosen.add(p)
        spent += cost
    return sorted(chosen)


def attention_view_value(cap: ColumnCapture, config, labels: list[str], query: int, n_prompt: int, layer: int,
                         head: int, budget: int = ROW_BUDGET) -> dict:
    """The attention view's payload over `labels` (one per slot, the last generated token
    included), opened at the inspected `query`, `layer` and `head` (ALL_HEADS: every head)."""
    cfg = config.text
    rows = rows_to_ship(cfg, cap.length, query, n_prompt, budget)
    patterns = dict(enumerate(cap.patterns))
    # twice the estimate: an image's tokens also reach the keys after them inside that image
    return attention_payload(labels, patterns, cfg.layer_types, cfg.sliding_window, query_positions=rows,
                             max_values=2 * max(budget, row_cost(cfg, query)), query=query, layer=layer,
                             head="all" if head == ALL_HEADS else head)


def lens_view_value(lens, query: int | None = None) -> dict:
    """The logit-lens table's payload (positions × layers, top-k on hover), the inspected
    slot `query` marked."""
    return logit_lens_payload(lens, query=query)
