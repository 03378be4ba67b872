"""Input attribution for one output logit: gradient × input and integrated gradients on the
scaled embeddings (what enters block 0: `hook_inputs_embeds`, image features included), each
with its own check.

Integrated gradients (Sundararajan et al. 2017) integrates the gradient along the straight
path from a baseline to the input; the attributions then sum to f(input) − f(baseline)
(completeness), up to the quadrature error, which is reported. The default baseline replaces
every token but a leading <bos> with the scaled <pad> embedding. A zero baseline is a trap on
Gemma: the first RMSNorm makes a position's output independent of its scale for all but the
smallest α (rms(αx) ≫ √eps), so f jumps inside α < ~1e-3 and the quadrature misses most of
the difference — completeness says so.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from gemma3_lab.errors import Gemma3LabError


@dataclass
class InputAttribution:
    """Per-input-token attribution of one output logit (or metric)."""

    values: Tensor  # (S,) float64, one per input token; zero after the explained position
    method: str  # "gradient × input" | "integrated gradients"
    position: int  # the position whose output is explained
    token: int  # the token whose logit is explained
    target: float  # f(input)
    baseline_target: float | None = None  # f(baseline), integrated gradients only
    steps: int | None = None

    @property
    def completeness_error(self) -> float | None:
        """|Σ attributions − (f(x) − f(baseline))| / |f(x) − f(baseline)| (integrated gradients)."""
        if self.baseline_target is None:
            return None
        gap = self.target - self.baseline_target
        return abs(float(self.values.sum()) - gap) / max(abs(gap), 1e-12)


@dataclass
class _Prepared:
    """The prompt cut just after the explained position, and its scaled embeddings."""

    ids: Tensor  # (1, E) long
    kwargs: dict  # attention_mask / token_types, cut the same way
    embeds: Tensor  # (1, E, D) what entered block 0 in the full run
    keep: int  # logits_to_keep so that logits[:, 0] is the explained position
    position: int
    full_length: int


def _cut_end(x, p: int) -> int:
    """Logits at p depend on tokens up to p only, except that an image's tokens see each
    other both ways: cut after p, or after the end of p's image."""
    for span in x.image_spans:
        if span.batch == 0 and span.start <= p < span.end:
            return span.end
    return p + 1


def prepare(model, inputs, position: int) -> _Prepared:
    x = model.to_inputs(inputs).to(model.device)
    if x.input_ids.shape[0] != 1:
        raise Gemma3LabError(f"input attribution explains one sequence, not a batch of {x.input_ids.shape[0]}")
    S = x.input_ids.shape[1]
    if not -S <= position < S:
        raise Gemma3LabError(f"position {position} is outside the {S} tokens of this prompt")
    p = position % S
    got = {}
    with torch.no_grad(), model.hooks([("hook_inputs_embeds", lambda t, hook: got.__setitem__("e", t))]):
        model(x, logits_to_keep=1)
    end = _cut_end(x, p)
    kwargs = {"attention_mask": x.attention_mask[:, :end], "token_types": x.token_types[:, :end]}
    return _Prepared(x.input_ids[:, :end], kwargs, got["e"][:, :end].detach(), end - p, p, S)


def _logit_fn(model, prep: _Prepared, token: int, metric=None):
    """f(embeds (k, E, D)) -> (k,) the logit of `token` (or metric(logits)) at the position."""
    def f(e: Tensor) -> Tensor:
        k = e.shape[0]
        kw = {n: v.expand(k, -1) for n, v in prep.kwargs.items()}
        with model.hooks([("hook_inputs_embeds", lambda t, hook: e)]):
            logits = model(prep.ids.expand(k, -1), logits_to_keep=prep.keep, **kw).logits[:, 0].float()
        return metric(logits) if metric is not None else logits[:, token]

    return f


def _default_token(model, prep: _Prepared, inputs, token) -> int:
    if token is not None:
        return int(token)
    ids = model.to_inputs(inputs).input_ids[0]
    if prep.position + 1 < len(ids):
        return int(ids[prep.position + 1])  # the token that followed: what was (or is being) written
    with torch.no_grad():
        return int(_logit_fn(model, prep, 0, metric=lambda lg: lg.argmax(-1).float())(prep.embeds)[0])


def _spread(prep: _Prepared, per_token: Tensor) -> Tensor:
    out = torch.zeros(prep.full_length, dtype=torch.float64)
    out[: per_token.shape[0]] = per_token.double().cpu()
    return out


def gradient_x_input(model, inputs, position: int = -1, token: int | None = None, metric=None) -> InputAttribution:
    """grad f · embedding, per input token, for the logit of `token` at `position` (default
    token: the one that follows `position` in the sequence, else the top prediction)."""
    prep = prepare(model, inputs, position)
    token = _default_token(model, prep, inputs, token)
    f = _logit_fn(model, prep, token, metric)
    e = prep.embeds.clone().requires_grad_()
    with torch.enable_grad():
        y = f(e)
        (g,) = torch.autograd.grad(y.sum(), e)
    vals = (g * prep.embeds).float().sum(-1)[0]
    return InputAttribution(_spread(prep, vals), "gradient × input", prep.position, token, float(y[0].detach()))


def baseline_embeds(model, prep: _Prepared, baseline) -> Tensor:
    """(1, E, D): "pad" — the scaled <pad> embedding at every position but a leading <bos>
    (a trained row in Gemma 3; a model whose <pad> row is zero makes this the zero trap);
    "zero"; or a (S, D) / (1, S, D) tensor over the whole sequence."""
    e = prep.embeds
    if isinstance(baseline, Tensor):
        b = baseline[None] if baseline.dim() == 2 else baseline
        if b.shape[-1] != e.shape[-1] or b.shape[1] < e.shape[1]:
            raise Gemma3LabError(f"baseline of shape {tuple(baseline.shape)} does not cover the "
                                 f"{prep.full_length} × {e.shape[-1]} embeddings")
        return b[:, : e.shape[1]].to(e)
    if baseline == "zero":
        return torch.zeros_like(e)
    if baseline != "pad":
        raise Gemma3LabError(f"baseline must be 'pad', 'zero' or a tensor, not {baseline!r}")
    cfg = model.config.text
    pad = model.embed(torch.tensor([cfg.pad_token_id], device=e.device))[0]
    b = (pad * torch.tensor(cfg.embed_scale, dtype=pad.dtype)).detach().expand_as(e).clone()
    if int(prep.ids[0, 0]) == cfg.bos_token_id:
        b[:, 0] = e[:, 0]  # the attention sink stays: its attribution is then exactly zero
    return b


def quadrature(steps: int, per_panel: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """(nodes, weights) on [0, 1]: composite Gauss–Legendre, `steps` // `per_panel` equal panels.

    Along Gemma's IG paths the integrand has narrow bumps (attention switching between keys as
    the prompt fades in); equal panels of a few nodes follow them where one high-order rule,
    whose nodes thin out in the middle, misses several percent."""
    panels = max(1, steps // per_panel)
    n = steps // panels
    x, w = np.polynomial.legendre.leggauss(n)  # on [-1, 1]
    lo = np.arange(panels)[:, None] / panels
    return (lo + (x + 1) / (2 * panels)).ravel(), np.tile(w / (2 * panels), panels)


def integrated_gradients(model, inputs, position: int = -1, token: int | None = None, baseline="pad",
                         steps: int = 64, batch_size: int = 8, metric=None) -> InputAttribution:
    """Integrated gradients on the scaled embeddings, `steps` quadrature nodes on the path
    baseline → input (see `quadrature`), `batch_size` of them per backward. `completeness_error` reports how far
    the sum is from f(x) − f(baseline)."""
    if steps < 1:
        raise Gemma3LabError(f"steps must be at least 1, not {steps}")
    prep = prepare(model, inputs, position)
    token = _default_token(model, prep, inputs, token)
    f = _logit_fn(model, prep, token, metric)
    x, b = prep.embeds, baseline_embeds(model, prep, baseline)
    nodes, weights = quadrature(steps)
    alphas = torch.tensor(nodes, dtype=x.dtype, device=x.device)
    w = torch.tensor(weights, dtype=torch.float64, device=x.device)
    avg = torch.zeros_like(x, dtype=torch.float64)
    for i in range(0, steps, batch_size):
        a = alphas[i : i + batch_size, None, None]
        path = (b + a * (x - b)).requires_grad_()  # (k, E, D)
        with torch.enable_grad():
            (g,) = torch.autograd.grad(f(path).sum(), path)
        avg += (g.double() * w[i : i + batch_size, None, None]).sum(0, keepdim=True)
    vals = ((x - b).double() * avg).sum(-1)[0]
    with torch.no_grad():
        ends = f(torch.cat([x, b]))
    return InputAttribution(_spread(prep, vals), "integrated gradients", prep.position, token,
                            float(ends[0]), float(ends[1]), steps)
