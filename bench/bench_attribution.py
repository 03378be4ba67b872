"""Cost of the attribution tools on the real bundled Gemma 3 270M at 512 tokens, as multiples
of one plain forward measured in the same run (the ceiling each is compared against):

  * `decompose_resid` + `logit_attrs` on a full capture (the capture's own forward excluded,
    and reported separately);
  * integrated gradients with 32 steps (32 forward+backward passes of the cut prompt);
  * attribution patching on the notebooks' clean/corrupt pair vs the exact patching sweep.

    .venv/bin/python bench/bench_attribution.py [--tokens 512] [--repeat 3]

Wall-clock medians; on a shared machine they are noisy, so the load average is printed too.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import torch

import gemma3_lab as gl
from gemma3_lab.analysis import attribution, attribution_patching, tour

PROMPT_FILE = Path(__file__).resolve().parents[1] / "tests" / "data" / "long_prompt.txt"


def median_s(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    model = gl.load(progress=False)
    ids = model.to_inputs(PROMPT_FILE.read_text()).input_ids[:, : args.tokens]
    with torch.no_grad():
        model(ids)  # warm-up
        fwd = median_s(lambda: model(ids), args.repeat)
    print(f"load average {os.getloadavg()[0]:.1f}; {ids.shape[1]} tokens; one forward {fwd * 1e3:.0f} ms (the unit)",
          flush=True)
    _, cache = model.run_with_cache(ids, top_k=0)
    capture = median_s(lambda: model.run_with_cache(ids, top_k=0), 1)
    report("run_with_cache (every hook point)", capture, fwd)
    top = int(ids[0, -1])
    report("decompose_resid + logit_attrs (all positions)",
           median_s(lambda: cache.logit_attrs(cache.decompose_resid(), top), args.repeat), fwd)
    report("stack_head_results + logit_attrs (last position)",
           median_s(lambda: cache.logit_attrs(cache.stack_head_results(pos_slice=-1), top, pos_slice=-1), args.repeat),
           fwd)
    del cache
    report("integrated gradients, 32 steps",
           median_s(lambda: attribution.integrated_gradients(model, ids, steps=32, batch_size=8), 1), fwd)
    clean = "The capital of France is Paris. The capital of Italy is"
    corrupt = "The capital of France is Paris. The capital of Spain is"
    metric = tour.logit_diff(model, " Rome", " Madrid")
    atp = median_s(lambda: attribution_patching.attribution_patching(model, clean, corrupt, metric), 1)
    exact = median_s(lambda: tour.patching_sweep(model, clean, corrupt, metric), 1)
    print(f"attribution patching vs the exact resid_pre sweep ({len(model.to_tokens(clean)[0])} tokens): "
          f"{atp:.2f} s vs {exact:.2f} s ({exact / atp:.1f}× faster, and it covers 5 sites + every head)")
    print(f"load average at the end {os.getloadavg()[0]:.1f}")


def report(what: str, seconds: float, unit: float) -> None:
    print(f"{what:<50} {seconds / unit:7.2f} × forward ({seconds:.2f} s)", flush=True)

if __name__ == "__main__":
    main()
