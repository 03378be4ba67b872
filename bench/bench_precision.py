"""Precision side by side on the bundled 270M: stored bytes of the decoder projections (int8
target <= 0.3x, int4 <= 0.2x float32), whole-model bytes, quality against float32 and
greedy-decode tokens/s, and where each variant's greedy output parts from float32's on the
bench prompts and why (float32's margin there against how far the variant moves margins).
Run: python bench/bench_precision.py [--tokens 16 --rounds 3]

Decode rounds are interleaved across variants so a busy machine slows all of them alike;
the median round is printed. On a shared CPU the absolute numbers are still noisy.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import torch

import gemma3_lab as gl
from gemma3_lab.analysis.compare import PRECISIONS, compare, greedy_divergence
from gemma3_lab.loading.quantize import DEFAULT, linear_weight_bytes, quantize_model, tensor_bytes

PROMPT = "The capital of France is"
PROMPTS = (PROMPT, "Once upon a time")  # the bench prompts of the int4 quality target
# label -> how to get it: a precision of the app's column setting, or one with an int8 embedding
VARIANTS = {name: (name, "float") for name in PRECISIONS}
VARIANTS.update({"int8 +emb8": ("int8", "int8"), "int4 +emb8": ("int4", "int8")})


def load_variant(precision: str, embedding: str, group_size: int):
    kwargs = dict(PRECISIONS[precision])
    mode = kwargs.pop("quantize", None)
    model = gl.load(progress=False, **kwargs)
    return quantize_model(model, mode, group_size, embedding) if mode else model


def decode_rate(model, n_tokens: int) -> float:
    """Tokens/s of the decode steps (the prefill excluded), greedy, no early stop."""
    return model.generate(PROMPT, max_new_tokens=n_tokens, stop_ids=(), record_top_k=1).tokens_per_second


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=16, help="new tokens per decode round")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved decode rounds per variant")
    ap.add_argument("--group-size", type=int, default=None,
                    help="input columns per (lo, step) of int8/int4; default: each mode's load default")
    args = ap.parse_args()

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.processor() or platform.machine()}, "
          f"load average {os.getloadavg()[0]:.1f} at start; group_size {args.group_size or 'each mode default'}; prompt {PROMPT!r}")
    models, load_s = {}, {}
    for label, (precision, embedding) in VARIANTS.items():
        t0 = time.perf_counter()
        models[label] = load_variant(precision, embedding, DEFAULT if args.group_size is None else args.group_size)
        load_s[label] = time.perf_counter() - t0
    ref = models["float32"]
    ref_linear, ref_total = linear_weight_bytes(ref), tensor_bytes(ref)
    ref_ids = ref.generate(PROMPT, max_new_tokens=args.tokens, stop_ids=()).token_ids

    rates: dict[str, list[float]] = {label: [] for label in models}
    for _ in range(args.rounds):
        for label, model in models.items():
            rates[label].append(decode_rate(model, args.tokens))

    base_rate = statistics.median(rates["float32"])
    head = (f"{'variant':>11} | {'linear MiB':>10} {'x f32':>6} | {'model MiB':>9} {'x f32':>6} | "
            f"{'KL last':>8} {'top-1':>5} {'prefix':>6} | {'tok/s':>6} {'x f32':>6} | {'load s':>6}")
    print(head)
    print("-" * len(head))
    for label, model in models.items():
        lin, tot = linear_weight_bytes(model), tensor_bytes(model)
        cmp = compare(ref, model, PROMPT)
        ids = model.generate(PROMPT, max_new_tokens=args.tokens, stop_ids=()).token_ids
        shared = next((i for i, (a, b) in enumerate(zip(ref_ids, ids)) if a != b), min(len(ref_ids), len(ids)))
        rate = statistics.median(rates[label])
        print(f"{label:>11} | {lin / 2**20:10.1f} {lin / ref_linear:6.3f} | {tot / 2**20:9.1f} {tot / ref_total:6.3f} | "
              f"{cmp.last_kl:8.4f} {cmp.top1_agreement:5.0%} {shared:3d}/{len(ref_ids):<2d} | "
              f"{rate:6.2f} {rate / base_rate:6.2f} | {load_s[label]:6.1f}")
    print(f"load average {os.getloadavg()[0]:.1f} at the end. KL last: KL(float32 || variant) of the next token "
          f"after the prompt, nats; top-1: agreement over the prompt's positions; prefix: greedy tokens "
          f"equal to float32's before the first difference. float16's residual stream outgrows 65504 mid-network, as "
          f"transformers' does (tests/test_precision.py), so its logits are NaN.")
    print("\nWhere greedy output parts from float32's (greedy_divergence): float32's margin (its token's logprob "
          "minus its runner-up's, nats) at each of its tokens; per variant, tokens kept before the first difference, "
          "float32's margin there, how far the variant moves float32's margins (median), and fed float32's tokens, "
          "at how many positions it picks float32's token.")
    for prompt in PROMPTS:
        shown = False  # float32's margins, once per prompt
        for label, model in models.items():
            if label == "float32":
                continue
            d = greedy_divergence(ref, model, prompt, args.tokens, ("float32", label))
            if not shown:
                shown, m = True, d.a_margin
                print(f"  {prompt!r}: float32's margins {' '.join(f'{x:.2f}' for x in m.tolist())}; "
                      f"{int((m < 0.1).sum())} under 0.1 nats, {int((m < 0.3).sum())} under 0.3")
            n, i = len(d.a_ids), d.first
            where = "never parts" if i is None else f"parts at token {i + 1}, float32's margin there {float(d.a_margin[i]):.3f}"
            print(f"    {label:>11}: keeps {d.shared:2d}/{n}, {where}; moves margins {float(d.margin_shift.median()):.3f} "
                  f"nats (median); fed float32's tokens picks them at {int(d.b_agrees.sum())}/{n}")


if __name__ == "__main__":
    main()
