"""Generations compared step by step: a table of what each run chose and how sure it was, the
candidates at the step where two runs part, and what an intervention changed — measured by
replaying one run's tokens with and without the intervention's hooks."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from gemma3_lab.generate import GenerationResult

DIVERGED = "≠"  # marks a run's step once it has left the first run's tokens


def _cell(text: str, prob: float, width: int) -> str:
    shown = repr(text)[1:-1] or "∅"
    if len(shown) > width - 6:
        shown = shown[: width - 7] + "…"
    return f"{shown:<{width - 6}} {prob:5.2f}"


def step_table(runs: dict[str, GenerationResult], steps: int | None = None, width: int = 20) -> str:
    """One row per step: for every run the text the step added and its probability under the
    model that chose it. From the step where a run first differs from the first run, its cells
    are marked ≠."""
    names = list(runs)
    first = runs[names[0]]
    part = {n: first.first_divergence(r) for n, r in runs.items()}
    n_steps = max(len(r.steps) for r in runs.values()) if steps is None else steps
    head = "step " + " ".join(f"{n[: width + 1]:<{width + 1}}" for n in names)
    lines = [head, "-" * len(head)]
    for i in range(n_steps):
        cells = []
        for n in names:
            r = runs[n]
            if i >= len(r.steps):
                cells.append(" " * (width + 1))
                continue
            mark = DIVERGED if part[n] is not None and i >= part[n] else " "
            cells.append(mark + _cell(r.steps[i].text, r.steps[i].prob, width))
        lines.append(f"{i:>4} " + " ".join(cells))
    return "\n".join(lines)


def top_k_table(result: GenerationResult, k: int = 3, steps: int | None = None) -> str:
    """One row per step of one run: the token chosen, then the model's top-k candidates there
    (under its own distribution at temperature 1, as `generate` records them)."""
    lines = [f"step {'chosen':<16} top {k} candidates"]
    for s in result.steps[:steps]:
        cands = "  ".join(f"{t!r} {p:.2f}" for t, p in s.top_k[:k])
        lines.append(f"{s.index:>4} {s.token!r:<16} {cands}")
    return "\n".join(lines)


def divergence_report(a: GenerationResult, b: GenerationResult, labels: tuple[str, str] = ("A", "B"),
                      k: int = 5) -> str:
    """Where two runs first choose differently, and each run's top-k candidates at that step."""
    i = a.first_divergence(b)
    if i is None:
        return f"{labels[0]} and {labels[1]} chose the same {len(a.steps)} tokens"
    if i >= min(len(a.steps), len(b.steps)):
        return f"{labels[0]} and {labels[1]} agree on their first {i} tokens; one of them stopped there"
    same = "".join(s.text for s in a.steps[:i])
    lines = [f"first divergence at step {i}, after {same!r}:"]
    for label, r in zip(labels, (a, b)):
        s = r.steps[i]
        cands = ", ".join(f"{t!r} {p:.2f}" for t, p in s.top_k[:k])
        lines.append(f"  {label}: chose {s.token!r} (p = {s.prob:.2f}); its top {k}: {cands}")
    return "\n".join(lines)


def steering_vector(model, layer: int, plus: str, minus: str, site: str = "hook_resid_post") -> Tensor:
    """(D,) the activation at `blocks.{layer}.{site}` for the last token of `plus` minus that of
    `minus` — an "activation addition" direction (Turner et al., 2023) for `interventions.steer`."""
    name = f"blocks.{layer}.{site}"
    acts = [model.run_with_cache(p, names_filter=name, positions=[-1])[1][name][0, -1] for p in (plus, minus)]
    return (acts[0] - acts[1]).float()


@dataclass
class ForcedEffect:
    """One run's tokens replayed with and without an intervention, per generated step."""

    tokens: list[str]  # the replayed run's tokens
    p_plain: Tensor  # (n,) probability of each token without the hooks
    p_hooked: Tensor  # (n,) with the hooks
    kl: Tensor  # (n,) KL(plain || hooked) of the next-token distribution, in nats
    top_plain: list[str]  # the most likely token at each step, without the hooks
    top_hooked: list[str]  # with the hooks

    def table(self) -> str:
        lines = ["step token            p plain  p hooked   KL (nats)  top-1 changes to"]
        for i, t in enumerate(self.tokens):
            flip = "" if self.top_hooked[i] == self.top_plain[i] else f"  {self.top_hooked[i]!r}"
            lines.append(f"{i:>4} {t!r:<16} {self.p_plain[i]:8.3f} {self.p_hooked[i]:9.3f} {self.kl[i]:11.3f}{flip}")
        return "\n".join(lines)


@torch.no_grad()
def forced_effect(model, result: GenerationResult, hooks) -> ForcedEffect:
    """Replay `result` (its prompt and generated tokens, one forward) with and without `hooks`
    and compare the next-token distributions at the positions that produced each token.

    After two runs diverge, this asks how the intervened model would have judged the plain
    run's tokens: the same prefix for both, so every difference is the intervention's."""
    ids = torch.tensor([result.prompt_ids + result.token_ids], device=model.device)
    n = len(result.token_ids)
    keep = n + 1  # the logits that predicted each generated token
    plain = model(ids, logits_to_keep=keep).logits[0, :n].float().log_softmax(-1)
    with model.hooks(hooks):
        hooked = model(ids, logits_to_keep=keep).logits[0, :n].float().log_softmax(-1)
    chosen = torch.tensor(result.token_ids, device=plain.device)[:, None]
    piece = model.tokenizer.id_to_token
    return ForcedEffect(
        tokens=[s.token for s in result.steps],
        p_plain=plain.gather(1, chosen)[:, 0].exp().cpu(),
        p_hooked=hooked.gather(1, chosen)[:, 0].exp().cpu(),
        kl=(plain.exp() * (plain - hooked)).sum(-1).cpu(),
        top_plain=[piece(int(i)) for i in plain.argmax(-1)],
        top_hooked=[piece(int(i)) for i in hooked.argmax(-1)],
    )


def plot_steps(runs: dict[str, GenerationResult]):
    """Probability of the chosen token at every step, one line per run; a dotted line where each
    run first leaves the first run's tokens."""
    import matplotlib.pyplot as plt

    names = list(runs)
    first = runs[names[0]]
    fig, ax = plt.subplots(figsize=(10, 3.6), layout="constrained")
    for j, (n, r) in enumerate(runs.items()):
        d = first.first_divergence(r) if j else None
        label = n if d is None else f"{n} · leaves {names[0]} at step {d}"
        line, = ax.plot([s.prob for s in r.steps], "o-", ms=4, lw=1.4, label=label)
        if d is not None:
            ax.axvline(d, color=line.get_color(), ls=":", lw=1.5)
    ax.set_xticks(range(max(len(r.steps) for r in runs.values())))
    ax.set_ylim(0, 1.05)
    ax.set_xlabel("generation step")
    ax.set_ylabel("p(chosen token)")
    ax.set_title("How sure each run was of the token it chose", fontsize=10)
    ax.legend(fontsize=8, loc="upper right", framealpha=0.9)
    return fig
