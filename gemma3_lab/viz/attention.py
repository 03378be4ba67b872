"""Attention patterns from a cache: one head as a heatmap with token tick labels, every head
of a layer, and where one token looks across all layers and heads. The images hold the
cached probabilities unchanged; a square-root colour scale only makes small weights visible."""

from __future__ import annotations

from torch import Tensor

from gemma3_lab.viz.common import dense, fig_label, label_figure, set_token_ticks, tick_positions, token_labels

CMAP = "magma_r"  # light = little attention, dark = much; masked cells grey
MASKED_GREY = "#d9d9d9"


def pattern(cache, layer: int, batch: int = 0) -> Tensor:
    """(N, S, T) softmax pattern of one layer, dense, from a cache or a list of (B, N, S, T) per layer."""
    p = cache[layer] if isinstance(cache, (list, tuple)) else cache["pattern", layer]
    p = dense(p)
    return p[batch].float().cpu()


def query_row(cache, query: int) -> int:
    """Row of slot `query` in the cached patterns: a cache run with `positions=` keeps only those."""
    pos = getattr(cache, "positions", None)
    if pos is None:
        return query
    kept = [int(p) for p in pos]
    if query not in kept:
        raise ValueError(f"slot {query} was not captured: this cache kept query positions {kept}")
    return kept.index(query)


def head_ids(cache, n: int) -> list[int]:
    """The model's head number of each stored head (a cache run with `heads=` keeps only those)."""
    heads = getattr(cache, "heads", None)
    return list(range(n)) if heads is None else [int(h) for h in heads]


def head_index(cache, head: int, n: int) -> int:
    ids = head_ids(cache, n)
    if head not in ids:
        raise ValueError(f"head {head} was not captured: this cache kept heads {ids}")
    return ids.index(head)


def row_labels(cache, tokens: list[str]) -> tuple[list[str], list[int] | None]:
    """Query-axis labels (and their slots) for a cache that kept only some positions."""
    pos = getattr(cache, "positions", None)
    if pos is None:
        return tokens, None
    return [tokens[int(p)] for p in pos], [int(p) for p in pos]


def layer_mask(cache, layer: int, batch: int = 0) -> Tensor | None:
    """(S, T) bool mask of the layer when the cache holds it (`hook_mask`), else None."""
    try:
        m = cache["mask", layer]
    except (KeyError, TypeError, IndexError):
        return None
    return m[min(batch, m.shape[0] - 1), 0].cpu()


def cache_tokens(cache, batch: int = 0) -> list[str]:
    """Token labels for the cache's input ids (soft tokens as "imgI·t")."""
    model = getattr(cache, "model", None)
    ids = getattr(cache, "input_ids", None)
    if model is None or ids is None:
        raise ValueError("pass tokens=[...]: this cache does not record its model and input ids")
    return token_labels(model.tokenizer, ids, model.config, getattr(cache, "image_spans", ()) or (), batch)


def _norm():
    from matplotlib.colors import PowerNorm

    return PowerNorm(gamma=0.5, vmin=0.0, vmax=1.0)


def _image(ax, values: Tensor, mask: Tensor | None):
    import matplotlib
    import numpy as np

    cmap = matplotlib.colormaps[CMAP].with_extremes(bad=MASKED_GREY)
    arr = values.numpy()
    if mask is not None:
        arr = np.ma.masked_array(arr, mask=~mask.numpy())
    return ax.imshow(arr, cmap=cmap, norm=_norm(), interpolation="nearest", aspect="auto")


def _kind(cache, layer: int) -> str:
    model = getattr(cache, "model", None)
    if model is None:
        return ""
    t = model.config.text.layer_types[layer]
    w = model.config.text.window_for(t)
    return f"{t.short}" + (f", window {w}" if w else "")


def _query_ticks(ax, cache, tokens: list[str], spans, y: bool = True, max_ticks: int = 64) -> None:
    """Keys on x; queries on y, which are only the captured positions when the cache kept some."""
    labels, slots = row_labels(cache, tokens)
    set_token_ticks(ax, tokens, "both" if y and slots is None else "x", spans, max_ticks)
    if not y or slots is None:
        return
    pos = tick_positions(len(labels), (), max_ticks)
    ax.set_yticks(pos, [f"{slots[i]} {fig_label(labels[i])}" for i in pos], fontsize=7)


def attention_heatmap(cache, layer: int, head: int, tokens: list[str] | None = None, batch: int = 0, spans=()):
    """One head's pattern (query rows × key columns) with the tokens on both axes."""
    import matplotlib.pyplot as plt

    tokens = tokens or cache_tokens(cache, batch)
    full = pattern(cache, layer, batch)
    p = full[head_index(cache, head, full.shape[0])]
    side = min(3.5 + 0.22 * p.shape[1], 12)
    fig, ax = plt.subplots(figsize=(side + 1.5, side + 0.8), layout="constrained")
    im = _image(ax, p, layer_mask(cache, layer, batch))
    _query_ticks(ax, cache, tokens, spans)
    ax.set_xlabel("key (attended to)")
    ax.set_ylabel("query (attending)")
    kind = _kind(cache, layer)
    ax.set_title(f"Layer {layer}{f' ({kind})' if kind else ''} · head {head} · attention probability")
    fig.colorbar(im, ax=ax, shrink=0.8, label="probability (square-root colour scale)")
    label_figure(fig, getattr(getattr(cache, "model", None), "config", None))
    return fig


def head_grid(cache, layer: int, tokens: list[str] | None = None, batch: int = 0, cols: int = 4, spans=()):
    """Every head of one layer side by side, on one shared colour scale."""
    import math

    import matplotlib.pyplot as plt

    tokens = tokens or cache_tokens(cache, batch)
    p = pattern(cache, layer, batch)
    N, S = p.shape[0], p.shape[2]
    ids = head_ids(cache, N)
    cols = min(cols, N)
    rows = math.ceil(N / cols)
    side = min(2.8 + 0.16 * S, 7)
    fig, axes = plt.subplots(rows, cols, figsize=(side * cols + 1.2, side * rows + 1.2), squeeze=False,
                             layout="constrained")
    mask = layer_mask(cache, layer, batch)
    im = None
    for h, ax in enumerate(axes.flat):
        if h >= N:
            ax.axis("off")
            continue
        im = _image(ax, p[h], mask)
        _query_ticks(ax, cache, tokens, spans, y=h % cols == 0, max_ticks=32)
        ax.set_title(f"head {ids[h]}", fontsize=10)
    kind = _kind(cache, layer)
    what = f"all {N} heads" if getattr(cache, "heads", None) is None else f"{N} captured heads"
    fig.suptitle(f"Layer {layer}{f' ({kind})' if kind else ''}: {what} · query ↓ key →")
    fig.colorbar(im, ax=axes, shrink=0.7, label="probability (square-root colour scale)")
    label_figure(fig, getattr(getattr(cache, "model", None), "config", None))
    return fig


def token_view_data(cache, query: int, layers=None, batch: int = 0) -> tuple[Tensor, list[tuple[int, int]]]:
    """(rows, T) attention of slot `query` for every (layer, head), and the (layer, head) of each row."""
    import torch

    n_layers = cache.model.config.text.num_layers if getattr(cache, "model", None) else None
    layers = list(range(n_layers)) if layers is None else list(layers)
    rows, keys = [], []
    r = query_row(cache, query)
    for layer in layers:
        p = pattern(cache, layer, batch)  # (N, S, T)
        for h, hid in enumerate(head_ids(cache, p.shape[0])):
            rows.append(p[h, r])
            keys.append((layer, hid))
    return torch.stack(rows), keys


def token_view(cache, query: int, tokens: list[str] | None = None, layers=None, batch: int = 0, spans=()):
    """Where one token looks: its attention over the keys for every layer (rows grouped) and head."""
    import matplotlib.pyplot as plt

    tokens = tokens or cache_tokens(cache, batch)
    data, keys = token_view_data(cache, query, layers, batch)
    T = data.shape[1]
    fig, ax = plt.subplots(figsize=(min(4 + 0.3 * T, 16), 2 + 0.14 * len(keys)), layout="constrained")
    im = ax.imshow(data.numpy(), cmap=CMAP, norm=_norm(), interpolation="nearest", aspect="auto")
    set_token_ticks(ax, tokens, "x", spans)
    model = getattr(cache, "model", None)
    starts = [i for i, (layer, h) in enumerate(keys) if i == 0 or keys[i - 1][0] != layer]
    names = []
    for i in starts:
        layer = keys[i][0]
        kind = model.config.text.layer_types[layer].short[0] if model is not None else ""
        names.append(f"L{layer}{' ' + kind if kind else ''}")
    ax.set_yticks(starts, names, fontsize=7)
    for i in starts[1:]:
        ax.axhline(i - 0.5, color="white", linewidth=0.8)
    ax.axvline(query, color="#1f77b4", linewidth=1.0, linestyle=":")
    n_heads = len(keys) // max(len(starts), 1)
    ax.set_ylabel(f"layer (l = local, g = global), {n_heads} heads each, head {keys[0][1]} on top")
    ax.set_xlabel("key (attended to)")
    ax.set_title(f"Where does {fig_label(tokens[query], 24)!r} (slot {query}) look? · every layer and head")
    fig.colorbar(im, ax=ax, shrink=0.8, label="probability (square-root colour scale)")
    label_figure(fig, getattr(model, "config", None))
    return fig
