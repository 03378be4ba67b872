"""Where images sit in the prompt and on the picture: the token strip (text, `<start_of_image>`,
256 soft tokens per image or crop, `<end_of_image>`), the picture with its crop boxes and 16×16
token grids, and text→image attention laid over the ORIGINAL picture, token by token."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from gemma3_lab.model.masks import model_masks
from gemma3_lab.viz.attention import head_index, layer_mask, pattern, query_row
from gemma3_lab.viz.common import fig_label, label_figure, token_labels
from gemma3_lab.viz.maskset import layer_windows

TEXT, SPECIAL = 0, 1  # strip codes; soft tokens of span k get code 2 + k
SPAN_COLORS = ["#e8a200", "#2a9d8f", "#8e5ccf", "#d1495b", "#3d7dd8", "#6a994e", "#bc6c25", "#577590"]


# ------------------------------------------------------------------------- geometry
def token_boxes(span) -> Tensor:
    """(grid², 4) float boxes (left, top, right, bottom) in the original picture's pixels:
    token t covers cell divmod(t, grid) of the span's crop box, which the processor resizes
    to the tower's square input (the pooled 16×16 grid, row-major)."""
    left, top, right, bottom = span.box
    g = span.grid
    w, h = (right - left) / g, (bottom - top) / g
    row, col = torch.div(torch.arange(g * g), g, rounding_mode="floor"), torch.arange(g * g) % g
    return torch.stack([left + col * w, top + row * h, left + (col + 1) * w, top + (row + 1) * h], dim=1).double()


def overlay_array(values, span, size: tuple[int, int]) -> np.ndarray:
    """(H, W) array over the original picture of `size` = (W, H): each pixel whose centre lies
    in the span's box gets the value of the token covering it, NaN elsewhere."""
    W, H = size
    values = np.asarray(values, dtype=np.float64).reshape(span.grid, span.grid)
    left, top, right, bottom = span.box
    out = np.full((H, W), np.nan)
    xs = np.arange(left, right)
    ys = np.arange(top, bottom)
    col = np.minimum(((xs + 0.5 - left) * span.grid / (right - left)).astype(int), span.grid - 1)
    row = np.minimum(((ys + 0.5 - top) * span.grid / (bottom - top)).astype(int), span.grid - 1)
    out[top:bottom, left:right] = values[row[:, None], col[None, :]]
    return out


def image_spans(inputs, image: int = 0, batch: int = 0) -> list:
    spans = [s for s in inputs.image_spans if s.image == image and s.batch == batch]
    if not spans:
        have = sorted({s.image for s in inputs.image_spans})
        raise ValueError(f"no image {image} in these inputs (images: {have or 'none'})")
    return sorted(spans, key=lambda s: s.crop)


def span_name(span) -> str:
    return f"image {span.image}" + (f" crop {span.crop}" if span.crop else " (whole picture)")


# ------------------------------------------------------------------------- token strip
def strip_codes(inputs, config, batch: int = 0) -> Tensor:
    """(T,) code of every slot: TEXT, SPECIAL (`<bos>`, image markers, pads) or 2 + span index."""
    ids = inputs.input_ids[batch]
    codes = torch.full_like(ids, TEXT)
    special = {config.text.bos_token_id, config.boi_token_id, config.eoi_token_id, config.text.pad_token_id}
    codes[torch.isin(ids, torch.tensor(sorted(special)))] = SPECIAL
    for k, s in enumerate(sorted((s for s in inputs.image_spans if s.batch == batch), key=lambda s: s.start)):
        codes[s.start:s.end] = 2 + k
    return codes


def token_strip(inputs, tokenizer, config, batch: int = 0):
    """The prompt as slots coloured by kind: to scale on top (an image is 256 slots), and
    below in reading order with every text token named and each image or crop one block."""
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Rectangle

    codes = strip_codes(inputs, config, batch)
    labels = token_labels(tokenizer, inputs.input_ids, config, inputs.image_spans, batch)
    spans = sorted((s for s in inputs.image_spans if s.batch == batch), key=lambda s: s.start)
    T = len(codes)
    colors = ["#cfd8e3", "#4a5a70"] + [SPAN_COLORS[k % len(SPAN_COLORS)] for k in range(len(spans))]
    # reading order: one cell per text slot, one block of BLOCK cells per span
    BLOCK = 6
    cells, i = [], 0
    while i < T:
        k = int(codes[i]) - 2
        if k >= 0:
            cells.append((BLOCK, colors[2 + k], f"{span_name(spans[k])}\n{spans[k].end - spans[k].start} soft tokens\n"
                                                 f"slots {spans[k].start}–{spans[k].end - 1}", None))
            i = spans[k].end
        else:
            cells.append((1, colors[int(codes[i])], fig_label(labels[i], 18), i))
            i += 1
    width = sum(c[0] for c in cells)
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(max(8, min(0.24 * width + 2, 22)), 4.4),
                                      height_ratios=[1, 2.2], layout="constrained")
    top.imshow(codes[None].numpy(), cmap=ListedColormap(colors), vmin=-0.5, vmax=len(colors) - 0.5,
               aspect="auto", interpolation="nearest", extent=(-0.5, T - 0.5, 0.5, -0.5))
    top.set_yticks([])
    top.set_xlabel("slot (to scale)", fontsize=8)
    top.tick_params(labelsize=7)
    x = 0
    for w, color, text, slot in cells:
        bottom.add_patch(Rectangle((x, 0), w, 1, facecolor=color, edgecolor="white", lw=1))
        if slot is None:
            bottom.text(x + w / 2, 0.5, text, ha="center", va="center", fontsize=7, color="white", weight="bold")
        else:
            bottom.text(x + w / 2, 1.08, f"{slot} {text}", rotation=90, ha="center", va="bottom", fontsize=7,
                        color="#4a5a70" if color == colors[SPECIAL] else "#222")
        x += w
    bottom.set_xlim(0, width)
    bottom.set_ylim(0, 2.9)
    bottom.axis("off")
    bottom.set_title("in reading order: text tokens one cell each (slot and piece), each image or crop one block",
                     fontsize=8, loc="left")
    n_soft = int((codes >= 2).sum())
    fig.suptitle(f"Token strip · {T} slots: {T - n_soft} text (incl. <bos> and image markers), {n_soft} image soft "
                 f"tokens in {len(spans)} block(s)", fontsize=11)
    label_figure(fig, config, images=True)
    return fig


# ------------------------------------------------------------------------- picture + grid
def overlay_cmap():
    """Transparent yellow for no attention to opaque dark red for the most: the picture shows
    through where a token gets little weight."""
    from matplotlib.colors import LinearSegmentedColormap

    return LinearSegmentedColormap.from_list(
        "attention_overlay", [(1.0, 0.9, 0.2, 0.0), (1.0, 0.55, 0.0, 0.6), (0.7, 0.0, 0.0, 0.92)])


def _picture(ax, img, grey: bool = False) -> None:
    if grey:  # a grey picture keeps the colour scale for the attention alone
        ax.imshow(np.asarray(img.convert("L")), cmap="gray", vmin=-60, vmax=255, extent=(0, img.width, img.height, 0))
    else:
        ax.imshow(np.asarray(img), extent=(0, img.width, img.height, 0), interpolation="bilinear")
    ax.set_xlim(0, img.width)
    ax.set_ylim(img.height, 0)


def _grid(ax, span, color: str = "white", lw: float = 0.5) -> None:
    left, top, right, bottom = span.box
    g = span.grid
    for i in range(g + 1):
        x = left + (right - left) * i / g
        y = top + (bottom - top) * i / g
        ax.plot([x, x], [top, bottom], color=color, lw=lw, alpha=0.8)
        ax.plot([left, right], [y, y], color=color, lw=lw, alpha=0.8)


def picture_grid(inputs, image: int = 0, batch: int = 0, config=None):
    """The original picture once per span: its crop box and the 16×16 grid of soft tokens,
    with the slots of the four corner tokens written in."""
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    img = inputs.images[image]
    spans = image_spans(inputs, image, batch)
    n = len(spans)
    h_in = 4.2 * img.height / img.width
    fig, axes = plt.subplots(1, n, figsize=(4.4 * n + 0.4, h_in + 1.6), squeeze=False, layout="constrained")
    for ax, s in zip(axes[0], spans):
        _picture(ax, img)
        left, top, right, bottom = s.box
        ax.add_patch(Rectangle((left, top), right - left, bottom - top, fill=False, edgecolor="#ff3b30", lw=2))
        _grid(ax, s)
        boxes = token_boxes(s)
        for t in (0, s.grid - 1, s.grid * (s.grid - 1), s.grid * s.grid - 1):
            l_, t_, r_, b_ = boxes[t].tolist()
            ax.text((l_ + r_) / 2, (t_ + b_) / 2, str(s.start + t), ha="center", va="center", fontsize=6,
                    color="black", bbox=dict(boxstyle="round,pad=0.15", fc="white", ec="none", alpha=0.85))
        ax.set_title(f"{span_name(s)}\nbox ({left}, {top}, {right}, {bottom}) · slots {s.start}–{s.end - 1}",
                     fontsize=9)
        ax.tick_params(labelsize=7)
    fig.suptitle(f"Image {image} ({img.width}×{img.height} px): each crop is resized to the tower's square input; "
                 f"its {spans[0].grid}×{spans[0].grid} soft tokens cover these cells (row-major)", fontsize=10)
    label_figure(fig, config, images=True)
    return fig


# ------------------------------------------------------------------------- attention on the picture
def span_attention(cache, span, query: int, layers, heads=None, batch: int = 0) -> Tensor:
    """(grid²,) attention from slot `query` to the span's soft tokens, averaged over the given
    layers and heads (all heads when None)."""
    rows = []
    r = query_row(cache, query)
    for layer in layers:
        p = pattern(cache, layer, batch)  # (N, S, T)
        hs = range(p.shape[0]) if heads is None else [head_index(cache, h, p.shape[0]) for h in heads]
        rows += [p[h, r, span.start:span.end] for h in hs]
    return torch.stack(rows).mean(0)


def span_reach(cache, inputs, span, query: int, layers, config=None, batch: int = 0) -> Tensor:
    """(grid²,) bool: which of the span's tokens slot `query` may attend to in at least one of
    `layers` — from the cached `hook_mask` when present, else from the model's mask functions."""
    reach = torch.zeros(span.end - span.start, dtype=torch.bool)
    computed = None
    for layer in layers:
        m = layer_mask(cache, layer, batch)
        if m is None:
            if computed is None:
                T = inputs.input_ids.shape[1]
                computed = model_masks(layer_windows(config), T, inputs.token_types, inputs.attention_mask)
            m = computed[layer][min(batch, computed[layer].shape[0] - 1), 0]
        reach |= m[query, span.start:span.end].cpu()
    return reach


def image_attention(cache, inputs, query: int | None = None, layers=None, heads=None, image: int = 0,
                    batch: int = 0, tokens: list[str] | None = None, config=None):
    """Attention from one token to every soft token of an image, drawn over the original
    picture: one panel per crop, each token's weight on the region it was made from."""
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    model = getattr(cache, "model", None)
    config = config or getattr(model, "config", None)
    T = inputs.input_ids.shape[1]
    query = T - 1 if query is None else query
    if layers is None:
        layers = range(config.text.num_layers) if config is not None else range(len(cache))
    layers = list(layers)
    img = inputs.images[image]
    spans = image_spans(inputs, image, batch)
    vals = [span_attention(cache, s, query, layers, heads, batch) for s in spans]
    vmax = max(float(v.max()) for v in vals) or 1.0
    n = len(spans)
    h_in = 4.2 * img.height / img.width
    fig, axes = plt.subplots(1, n, figsize=(4.4 * n + 1.2, h_in + 1.8), squeeze=False, layout="constrained")
    im = None
    for ax, s, v in zip(axes[0], spans, vals):
        _picture(ax, img, grey=True)
        left, top, right, bottom = s.box
        im = ax.imshow(v.reshape(s.grid, s.grid).numpy(), extent=(left, right, bottom, top), cmap=overlay_cmap(),
                       vmin=0.0, vmax=vmax, interpolation="nearest")
        ax.add_patch(Rectangle((left, top), right - left, bottom - top, fill=False, edgecolor="#ff3b30", lw=1.5))
        out = ~span_reach(cache, inputs, s, query, layers, config, batch) if config is not None else torch.zeros(0)
        for t in torch.nonzero(out).flatten().tolist():  # masked for this query in every chosen layer
            l_, t_, r_, b_ = token_boxes(s)[t].tolist()
            ax.add_patch(Rectangle((l_, t_), r_ - l_, b_ - t_, fill=False, hatch="////", edgecolor="#555", lw=0))
        ax.set_xlim(0, img.width)
        ax.set_ylim(img.height, 0)
        masked = f"; {int(out.sum())} masked (hatched)" if int(out.sum()) else ""
        ax.set_title(f"{span_name(s)} · slots {s.start}–{s.end - 1}\n"
                     f"sum over its {s.end - s.start} tokens {float(v.sum()):.3g}, max {float(v.max()):.3g}{masked}",
                     fontsize=9)
        ax.tick_params(labelsize=7)
    if tokens is None and model is not None:
        tokens = token_labels(model.tokenizer, inputs.input_ids, config, inputs.image_spans, batch)
    who = f"{fig_label(tokens[query], 24)!r} (slot {query})" if tokens else f"slot {query}"
    n_avg = len(layers) * (len(list(heads)) if heads is not None else 2)
    fig.suptitle(f"Attention from {who} to image {image} · {_which(layers, 'layer')} · "
                 f"{_which(heads, 'head') if heads is not None else 'all heads'}{' (mean)' if n_avg > 1 else ''}",
                 fontsize=11)
    fig.colorbar(im, ax=axes, shrink=0.8, label="attention probability (mean)")
    label_figure(fig, config, images=True)
    return fig


def _which(xs, name: str) -> str:
    xs = list(xs)
    if len(xs) == 1:
        return f"{name} {xs[0]}"
    if xs == list(range(xs[0], xs[-1] + 1)):
        return f"{name}s {xs[0]}–{xs[-1]}"
    return f"{name}s {', '.join(map(str, xs))}"
