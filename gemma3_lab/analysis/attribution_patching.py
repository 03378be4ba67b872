"""Attribution patching (Nanda 2023; Syed et al. 2023): the first-order estimate of every
activation patch at once. Patching the clean activation a_c into the corrupt run at a site
changes the metric by about (a_c − a_x) · ∂metric/∂a at the corrupt run — one forward and one
backward for every residual site and every head, instead of one forward per patch.

The result is laid out as the exact sweeps in `analysis/tour/sweeps.py` (`patching_sweep`:
(layer, position) per residual site; `head_patching_sweep`: (layer, head)), with `values` the
estimated metric, so `.effect` reads the same and the two can be compared cell by cell.
"""

from __future__ import annotations

import torch

from gemma3_lab.analysis.tour.sweeps import Sweep, pair_ids

RESID_SITES = ("hook_resid_pre", "hook_resid_mid", "hook_resid_post", "hook_attn_out", "hook_mlp_out")


def corrupt_gradients(model, ids, metric, names: list[str]) -> tuple[float, dict, dict]:
    """(metric, {name: activation}, {name: ∂metric/∂activation}) of one run, one backward."""
    acts: dict = {}

    def leaf(t, hook):  # the graph starts here: the weights need no gradient
        return t.detach().requires_grad_()

    def keep(t, hook):
        acts[hook.name] = t

    with torch.enable_grad(), model.hooks([("hook_inputs_embeds", leaf)] + [(n, keep) for n in names]):
        m = metric(model(ids, logits_to_keep=1).logits[:, -1].float())[0]
        grads = torch.autograd.grad(m, [acts[n] for n in names], allow_unused=True)
    grads = {n: torch.zeros_like(acts[n]) if g is None else g for n, g in zip(names, grads)}
    return float(m.detach()), {n: a.detach() for n, a in acts.items()}, grads


def attribution_patching(model, clean, corrupt, metric, sites=RESID_SITES) -> dict[str, Sweep]:
    """Estimated metric of the corrupt run with one clean activation patched in, for every
    (layer, position) of each residual `site`, plus "attn.hook_z" per (layer, head) (that head
    patched at every position) and per (layer, position) (every head at that position), keyed
    "attn.hook_z" and "attn.hook_z/positions"."""
    ci, xi = pair_ids(model, clean, corrupt)
    L, S = model.config.text.num_layers, ci.shape[1]
    names = [f"blocks.{i}.{s}" for s in (*sites, "attn.hook_z") for i in range(L)]
    with torch.no_grad():
        logits, clean_cache = model.run_with_cache(ci, names_filter=names, top_k=0)
    ref = float(metric(logits[:, -1].float())[0])
    base, acts, grads = corrupt_gradients(model, xi, metric, names)

    def est(name):  # (a_clean − a_corrupt) · grad, summed over the feature axes -> (S, ...)
        return ((clean_cache[name].float() - acts[name].float()) * grads[name].float())[0].double()

    piece = model.tokenizer.id_to_token if model.tokenizer is not None else str
    cols = [piece(int(a)) if a == b else f"{piece(int(b))}→{piece(int(a))}" for a, b in zip(ci[0], xi[0])]
    rows = [f"L{i}" for i in range(L)]
    out = {}
    for s in sites:
        v = torch.stack([est(f"blocks.{i}.{s}").sum(-1) for i in range(L)])  # (L, S)
        out[s] = Sweep(base + v, base, ref, rows, cols, f"Attribution patching {s}: share of the gap closed (estimate)")
    z = torch.stack([est(f"blocks.{i}.attn.hook_z").sum(-1) for i in range(L)])  # (L, S, N)
    N = z.shape[-1]
    out["attn.hook_z"] = Sweep(base + z.sum(1), base, ref, rows, [f"head {h}" for h in range(N)],
                               "Attribution patching each head's hook_z: share of the gap closed (estimate)")
    out["attn.hook_z/positions"] = Sweep(base + z.sum(2), base, ref, rows, cols,
                                         "Attribution patching attn.hook_z: share of the gap closed (estimate)")
    return out


def agreement(estimate: Sweep, exact: Sweep) -> float:
    """Pearson correlation of two sweeps' effects, cell by cell."""
    a, b = estimate.effect.flatten().double(), exact.effect.flatten().double()
    return float(torch.corrcoef(torch.stack([a, b]))[0, 1])
