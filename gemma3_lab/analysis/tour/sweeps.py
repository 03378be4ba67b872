"""Interventions repeated over a grid: every head zero-ablated, or every (layer, position)
patched from a clean run, each measured by a metric of the last position's logits; batched
so that one forward covers a whole layer."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


def token_id(model, text: str) -> int:
    """The id of `text` as one token (e.g. " Rome" -> the id of "▁Rome"); an error if it is several."""
    ids = model.tokenizer.encode(text, add_bos=False)
    if len(ids) != 1:
        raise ValueError(f"{text!r} is {len(ids)} tokens {[model.tokenizer.id_to_token(i) for i in ids]}, not one")
    return ids[0]


def logit_diff(model, good: str, bad: str):
    """metric(logits (B, V)) -> (B,): logit of token `good` minus logit of token `bad`."""
    g, b = token_id(model, good), token_id(model, bad)
    return lambda logits: (logits[:, g] - logits[:, b]).float()


@dataclass
class Sweep:
    """A metric measured once per intervention, laid out as a (rows, cols) grid."""

    values: Tensor  # (rows, cols) the metric under each intervention
    baseline: float  # the metric without intervention (the run being intervened on)
    reference: float | None  # patching: the metric of the source run
    rows: list[str]
    cols: list[str]
    title: str

    @property
    def effect(self) -> Tensor:
        """Ablation: values - baseline. Patching: the share of the gap closed,
        (values - baseline) / (reference - baseline): 0 = no effect, 1 = fully restored."""
        if self.reference is None:
            return self.values - self.baseline
        return (self.values - self.baseline) / (self.reference - self.baseline)


def pair_ids(model, clean, corrupt) -> tuple[Tensor, Tensor]:
    """(1, S) ids of a clean and a corrupt prompt, which must have the same number of tokens."""
    ci, xi = (model.to_inputs(p).input_ids.to(model.device) for p in (clean, corrupt))
    if ci.shape != xi.shape:
        raise ValueError(f"clean and corrupt prompts must have the same length, not {ci.shape[1]} and {xi.shape[1]}")
    return ci, xi


@torch.no_grad()
def head_ablation_sweep(model, prompt, metric) -> Sweep:
    """Zero each query head of each layer in turn (its `hook_z` output, before o_proj) and
    measure `metric` on the last position's logits; one batched forward per layer."""
    ids = model.to_inputs(prompt).input_ids.to(model.device)
    N, L = model.config.text.num_heads, model.config.text.num_layers
    base = float(metric(model(ids, logits_to_keep=1).logits[:, -1])[0])
    batch = ids.expand(N, -1)
    values = torch.empty(L, N, dtype=torch.float64)
    for layer in range(L):
        def zero_one_head_per_row(z, hook):  # z (N rows, S, N heads, H): row h loses head h
            z = z.clone()
            z[torch.arange(N), :, torch.arange(N)] = 0.0
            return z

        with model.hooks([(f"blocks.{layer}.attn.hook_z", zero_one_head_per_row)]):
            values[layer] = metric(model(batch, logits_to_keep=1).logits[:, -1]).cpu()
    return Sweep(values, base, None, [f"L{i}" for i in range(L)], [f"head {h}" for h in range(N)],
                 "Zero-ablating one head: change in the metric")


@torch.no_grad()
def patching_sweep(model, clean, corrupt, metric, site: str = "hook_resid_pre") -> Sweep:
    """Activation patching: run `corrupt` with the `clean` run's activation at one (layer,
    position) of `blocks.{layer}.{site}` and measure `metric` on the last position's logits.
    The prompts must have the same number of tokens; one batched forward per layer."""
    ci, xi = pair_ids(model, clean, corrupt)
    S, L = ci.shape[1], model.config.text.num_layers
    logits, cache = model.run_with_cache(ci, names_filter=f"blocks.*.{site}")
    ref = float(metric(logits[:, -1].float())[0])
    base = float(metric(model(xi, logits_to_keep=1).logits[:, -1])[0])
    batch = xi.expand(S, -1)
    values = torch.empty(L, S, dtype=torch.float64)
    for layer in range(L):
        src = cache[f"blocks.{layer}.{site}"][0]  # (S, D)

        def one_position_per_row(x, hook, src=src):  # row p gets the clean activation at position p
            x = x.clone()
            x[torch.arange(S), torch.arange(S)] = src.to(x.dtype)
            return x

        with model.hooks([(f"blocks.{layer}.{site}", one_position_per_row)]):
            values[layer] = metric(model(batch, logits_to_keep=1).logits[:, -1]).cpu()
    piece = model.tokenizer.id_to_token if model.tokenizer is not None else str
    cols = [piece(int(a)) if a == b else f"{piece(int(b))}→{piece(int(a))}" for a, b in zip(ci[0], xi[0])]
    return Sweep(values, base, ref, [f"L{i}" for i in range(L)], cols,
                 f"Patching {site} from the clean run: share of the gap closed")



@torch.no_grad()
def head_patching_sweep(model, clean, corrupt, metric) -> Sweep:
    """Activation patching per head: run `corrupt` with one head's `hook_z` (every position)
    taken from the `clean` run; one batched forward per layer, one head per batch row."""
    ci, xi = pair_ids(model, clean, corrupt)
    N, L = model.config.text.num_heads, model.config.text.num_layers
    logits, cache = model.run_with_cache(ci, names_filter="blocks.*.attn.hook_z", top_k=0)
    ref = float(metric(logits[:, -1].float())[0])
    base = float(metric(model(xi, logits_to_keep=1).logits[:, -1])[0])
    values = torch.empty(L, N, dtype=torch.float64)
    for layer in range(L):
        src = cache[f"blocks.{layer}.attn.hook_z"][0]  # (S, N, H)

        def one_head_per_row(z, hook, src=src):  # z (N rows, S, N heads, H): row h gets clean head h
            z = z.clone()
            z[torch.arange(N), :, torch.arange(N)] = src.transpose(0, 1).to(z.dtype)
            return z

        with model.hooks([(f"blocks.{layer}.attn.hook_z", one_head_per_row)]):
            values[layer] = metric(model(xi.expand(N, -1), logits_to_keep=1).logits[:, -1]).cpu()
    return Sweep(values, base, ref, [f"L{i}" for i in range(L)], [f"head {h}" for h in range(N)],
                 "Patching one head's hook_z from the clean run: share of the gap closed")

def plot_sweep(s: Sweep, effect: bool = True):
    """A (rows × cols) heatmap of a sweep's effect (or raw values), centred on zero."""
    import matplotlib.pyplot as plt

    v = (s.effect if effect else s.values).numpy()
    lim = float(abs(v).max()) or 1.0
    fig, ax = plt.subplots(figsize=(1.6 + 0.62 * v.shape[1], 1.4 + 0.3 * v.shape[0]), layout="constrained")
    im = ax.imshow(v, cmap="RdBu", vmin=-lim, vmax=lim, aspect="auto", interpolation="nearest")
    ax.set_xticks(range(v.shape[1]), s.cols, rotation=60, ha="right", fontsize=8)
    ax.set_yticks(range(v.shape[0]), s.rows, fontsize=8)
    ax.set_title(s.title, fontsize=10)
    fig.colorbar(im, ax=ax, shrink=0.8)
    return fig
