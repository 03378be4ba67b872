"""Two loaded variants of one model (float32 vs int4, say) on the same input: how far apart
their residual streams are at every layer and how different the next-token distributions."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from gemma3_lab.load import load
from gemma3_lab.loading.quantize import DEFAULT

# the column setting "precision": weights dtype, then weight-only quantization over float32
PRECISIONS = {
    "float32": dict(dtype="float32"),
    "bfloat16": dict(dtype="bfloat16"),
    "float16": dict(dtype="float16"),
    "int8": dict(dtype="float32", quantize="int8"),
    "int4": dict(dtype="float32", quantize="int4"),
}


def load_precision(name_or_path=None, precision: str = "float32", device="cpu", progress: bool = True,
                   group_size: int | None | str = DEFAULT):
    """`gl.load` with one of PRECISIONS; int8/int4 quantize the float32 model's projections."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; valid: {', '.join(PRECISIONS)}")
    return load(name_or_path, device=device, progress=progress, group_size=group_size, **PRECISIONS[precision])


@dataclass
class Comparison:
    """B measured against A on one prompt. Errors are relative to A; KL is KL(P_A || P_B) in nats."""

    labels: tuple[str, str]
    token_ids: list[int]  # the prompt, S tokens
    tokens: list[str]  # their pieces
    sites: list[str]  # "embed", "layer 0", ..., "layer L-1": the residual stream after each
    resid_rel_error: Tensor  # (L+1,) ||B - A|| / ||A|| over every position and feature
    resid_rel_error_by_position: Tensor  # (L+1, S) the same per position
    kl: Tensor  # (S,) of the distribution over the token after each position
    top1_a: Tensor  # (S,) A's most likely next token at each position
    top1_b: Tensor  # (S,)

    @property
    def top1_agreement(self) -> float:
        return float((self.top1_a == self.top1_b).float().mean())

    @property
    def last_kl(self) -> float:
        """KL of what each variant would generate next."""
        return float(self.kl[-1])

    def summary(self, by_layer: bool = True) -> str:
        """One line (B against A: next-token KL and top-1 agreement), then, `by_layer`, the
        residual stream's relative error after each layer. The app's Compare tab shows the line."""
        a, b = self.labels
        lines = [f"{b} vs {a} on {len(self.token_ids)} tokens: next-token KL(A ‖ B) at the last position "
                 f"{self.last_kl:.4g} nats (mean {float(self.kl.mean()):.4g}, max {float(self.kl.max()):.4g}); "
                 f"top-1 agreement {self.top1_agreement:.1%}"]
        if not by_layer:
            return lines[0]
        lines.append("residual stream relative error by layer:")
        lines += [f"  {s:>9}  {float(e):.3e}" for s, e in zip(self.sites, self.resid_rel_error)]
        return "\n".join(lines)

    def to_dict(self) -> dict:
        """Plain lists and floats, for the app and JSON."""
        return {
            "labels": list(self.labels), "token_ids": self.token_ids, "tokens": self.tokens, "sites": self.sites,
            "resid_rel_error": self.resid_rel_error.tolist(),
            "resid_rel_error_by_position": self.resid_rel_error_by_position.tolist(),
            "kl": self.kl.tolist(), "top1_a": self.top1_a.tolist(), "top1_b": self.top1_b.tolist(),
            "top1_agreement": self.top1_agreement, "last_kl": self.last_kl,
        }


def residual_sites(model) -> list[str]:
    """Hook names of the residual stream: what enters block 0, then each block's output."""
    return ["hook_inputs_embeds"] + [f"blocks.{i}.hook_resid_post" for i in range(model.config.text.num_layers)]


@torch.no_grad()
def run_residuals(model, input_ids: Tensor) -> tuple[Tensor, Tensor]:
    """(residuals (L+1, S, D) float32, logits (S, V) float32) for one prompt (1, S)."""
    store: dict[str, Tensor] = {}

    def save(t, hook):
        store[hook.name] = t[0].float()

    sites = residual_sites(model)
    with model.hooks([(n, save) for n in sites]):
        logits = model(input_ids.to(model.device)).logits[0].float()
    return torch.stack([store[n].cpu() for n in sites]), logits.cpu()


def compare(a, b, inputs, labels: tuple[str, str] = ("A", "B")) -> Comparison:
    """Run one prompt (text, ids or Inputs, tokenized by A) through A and B and compare."""
    if a.config.text != b.config.text:
        raise ValueError("compare needs two variants of the same model (their text configs differ)")
    ids = a.to_inputs(inputs).input_ids
    if ids.shape[0] != 1:
        raise ValueError("compare takes one prompt at a time")
    ra, la = run_residuals(a, ids)
    rb, lb = run_residuals(b, ids)
    return compare_residuals(ra, rb, *next_token_kl(la, lb), ids[0].tolist(), a.tokenizer, labels)


def next_token_kl(la: Tensor, lb: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(KL(P_A || P_B) (S,), A's top-1 (S,), B's top-1 (S,)) from two (S, V) logits."""
    lpa, lpb = la.float().log_softmax(-1), lb.float().log_softmax(-1)
    return (lpa.exp() * (lpa - lpb)).sum(-1), la.argmax(-1), lb.argmax(-1)


@torch.no_grad()
def next_token_kl_from_residuals(a, b, last_a: Tensor, last_b: Tensor, chunk: int = 128):
    """`next_token_kl` of A's and B's heads read off their residuals after the last block
    ((S, D) each: final norm, head), a chunk of positions at a time: a long prompt never holds
    its whole (S, V) logits."""
    parts = []
    for i in range(0, last_a.shape[0], chunk):
        la, lb = (m._unembed(m.final_norm(r[i: i + chunk].to(device=m.device, dtype=m.dtype))[None])[0].float().cpu()
                  for m, r in ((a, last_a), (b, last_b)))
        parts.append(next_token_kl(la, lb))
    return tuple(torch.cat(x) for x in zip(*parts))


def compare_residuals(ra: Tensor, rb: Tensor, kl: Tensor, top1_a: Tensor, top1_b: Tensor, token_ids: list[int],
                      tokenizer=None, labels: tuple[str, str] = ("A", "B")) -> Comparison:
    """B against A from residuals already computed ((L+1, S, D) each: what enters block 0, then
    every block's output) and `next_token_kl`'s three tensors: what `compare` measures, for
    runs that were captured rather than run again (the app's two columns)."""
    if ra.shape != rb.shape or ra.shape[1] != len(token_ids) or kl.shape != (len(token_ids),):
        raise ValueError(f"A and B must cover the same positions: residuals {tuple(ra.shape)} vs {tuple(rb.shape)}, "
                         f"KL {tuple(kl.shape)}, {len(token_ids)} tokens")
    diff = rb - ra  # (L+1, S, D)
    by_pos = diff.norm(dim=-1) / ra.norm(dim=-1).clamp_min(torch.finfo(torch.float32).tiny)
    overall = diff.flatten(1).norm(dim=-1) / ra.flatten(1).norm(dim=-1)
    return Comparison(
        labels=tuple(labels),
        token_ids=list(token_ids),
        tokens=[tokenizer.id_to_token(i) for i in token_ids] if tokenizer is not None else [str(i) for i in token_ids],
        sites=["embed"] + [f"layer {i}" for i in range(ra.shape[0] - 1)],
        resid_rel_error=overall,
        resid_rel_error_by_position=by_pos,
        kl=kl,
        top1_a=top1_a,
        top1_b=top1_b,
    )


# ---------------------------------------------------------------------------- greedy generations
@dataclass
class Divergence:
    """Where B's greedy generation parts from A's, and why it could: A's margin at each of its
    tokens against what B does to that margin. Logprobs in nats; "along A" means B is fed A's
    own tokens (teacher-forced), so each position asks only "would B pick A's next token here?"."""

    labels: tuple[str, str]
    prompt_ids: list[int]
    a_ids: list[int]  # A's greedy tokens
    b_ids: list[int]  # B's greedy tokens, from the same prompt
    a_margin: Tensor  # (n,) A's logprob of its token minus its runner-up's
    b_margin: Tensor  # (n,) B's logprob of A's token minus A's runner-up's, along A's tokens
    b_agrees: Tensor  # (n,) bool: B's own top token along A's tokens is A's token
    a_pieces: list[str]  # A's tokens and runners-up, as pieces
    runner_up: list[str]

    @property
    def shared(self) -> int:
        """Greedy tokens B keeps before the first difference."""
        pairs = zip(self.a_ids, self.b_ids)
        return next((i for i, (x, y) in enumerate(pairs) if x != y), min(len(self.a_ids), len(self.b_ids)))

    @property
    def first(self) -> int | None:
        """Index of the first generated token where B differs from A (None: none does)."""
        return None if self.shared == len(self.a_ids) else self.shared  # both run to max_new_tokens

    @property
    def same_positions(self) -> int:
        """Tokens of B equal to A's at the same index (after a difference, only by chance)."""
        return sum(x == y for x, y in zip(self.a_ids, self.b_ids))

    @property
    def margin_shift(self) -> Tensor:
        """(n,) how far B moves A's margin: |b_margin - a_margin|."""
        return (self.b_margin - self.a_margin).abs()

    def summary(self) -> str:
        """One paragraph: how much of A's greedy output B keeps, what A's margin was where they
        part, and how far B moves margins in general (the bar a margin must clear to survive)."""
        a, b = self.labels
        n = len(self.a_ids)
        shift = float(self.margin_shift.median())
        along = f"fed {a}'s tokens, {b} picks {a}'s next token at {int(self.b_agrees.sum())} of {n} positions"
        if self.first is None:
            return f"{b} keeps all {n} of {a}'s greedy tokens; {along}; it moves {a}'s margins by {shift:.3f} nats (median)."
        i = self.first
        return (f"{b} keeps {i} of {a}'s {n} greedy tokens, then parts: at token {i + 1} {a} chose {self.a_pieces[i]!r} "
                f"over {self.runner_up[i]!r} by {float(self.a_margin[i]):.3f} nats, and {b} moves {a}'s margins by "
                f"{shift:.3f} nats (median, max {float(self.margin_shift.max()):.3f}); {along}.")


@torch.no_grad()
def greedy_divergence(a, b, inputs, max_new_tokens: int = 16, labels: tuple[str, str] = ("A", "B")) -> Divergence:
    """Generate greedily with A and B from one text prompt (or ids), then run both over A's
    output to see where B parts from it and by how little A's choice was made there: a
    low-bit variant that keeps few of float32's tokens may differ only at a near-tie."""
    if a.config.text != b.config.text:
        raise ValueError("greedy_divergence needs two variants of the same model (their text configs differ)")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a whole number >= 1, not {max_new_tokens!r}")
    inp = a.to_inputs(inputs)
    if inp.input_ids.shape[0] != 1 or inp.pixel_values is not None:
        raise ValueError("greedy_divergence takes one text prompt (no image) at a time")
    ra = a.generate(inp, max_new_tokens=max_new_tokens, stop_ids=())
    rb = b.generate(inp, max_new_tokens=max_new_tokens, stop_ids=())
    prompt = inp.input_ids[0].tolist()
    p = len(prompt)
    ids = torch.tensor([prompt + ra.token_ids[:-1]])
    # position p - 1 + t predicts A's token t
    lpa, lpb = (m(ids.to(m.device)).logits[0, p - 1:].float().cpu().log_softmax(-1) for m in (a, b))
    tok = torch.tensor(ra.token_ids, dtype=torch.long)
    rival = lpa.scatter(1, tok[:, None], float("-inf")).argmax(-1)  # A's runner-up at each position

    def margin(lp: Tensor) -> Tensor:
        return lp.gather(1, tok[:, None])[:, 0] - lp.gather(1, rival[:, None])[:, 0]

    tok_of = getattr(a, "tokenizer", None)
    piece = (lambda i: tok_of.id_to_token(int(i))) if tok_of is not None else (lambda i: str(int(i)))  # a bare network: ids
    return Divergence(
        labels=tuple(labels), prompt_ids=prompt, a_ids=list(ra.token_ids), b_ids=list(rb.token_ids),
        a_margin=margin(lpa), b_margin=margin(lpb), b_agrees=lpb.argmax(-1) == tok,
        a_pieces=[piece(i) for i in tok], runner_up=[piece(i) for i in rival],
    )
