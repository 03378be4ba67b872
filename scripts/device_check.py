"""End-to-end check of gemma3_lab on an accelerator, against the same run on the CPU.

    .venv/bin/python scripts/device_check.py [--device cuda]

For a session that is lent a GPU machine: one short script (about a minute on the bundled
270M) that loads, runs, captures, generates and quantizes on `--device`, compares each
result with the CPU, prints one line per check and exits 1 if any fails. With
`--device cpu` it checks the script itself (the test suite runs it that way).
"""

from __future__ import annotations

import argparse
import sys
import time

import torch
from PIL import Image

import gemma3_lab as gl
from gemma3_lab.load import resolve_device

PROMPT = "The capital of France is"
FAILED: list[str] = []


def check(name: str, ok: bool, detail: str) -> None:
    print(f"{'ok  ' if ok else 'FAIL'} {name:44s} {detail}", flush=True)
    if not ok:
        FAILED.append(name)


@torch.no_grad()
def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--device", default="cuda", help="the device checked against the CPU (cpu checks the script itself)")
    args = ap.parse_args()
    try:
        dev = resolve_device(args.device)
    except (ValueError, RuntimeError) as e:  # no such device here, or a name torch does not know
        print(f"error: --device {args.device}: {e}", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    print(f"torch {torch.__version__}; device {dev}"
          + (f" ({torch.cuda.get_device_name(dev)})" if dev.type == "cuda" else ""))

    cpu = gl.load(progress=False)
    acc = gl.load(device=dev, progress=False)
    check("model on the device", acc.device.type == dev.type, f"{acc.device}, {acc.dtype}")
    ids = cpu.to_inputs(PROMPT).input_ids
    ref = cpu(ids).logits
    got = acc(ids.to(dev)).logits.cpu()
    err = (got - ref).abs().max().item()
    check("float32 logits vs CPU", err < 2e-3 and torch.equal(got.argmax(-1), ref.argmax(-1)), f"max |Δ| {err:.2e}")

    a, b = cpu.generate(PROMPT, max_new_tokens=16), acc.generate(PROMPT, max_new_tokens=16)
    check("greedy 16 tokens vs CPU", a.token_ids == b.token_ids, repr(b.text[:50]))

    names = ["blocks.0.attn.hook_mask", "blocks.5.attn.hook_mask", "blocks.5.attn.hook_pattern"]
    _, c_cpu = cpu.run_with_cache(ids, names_filter=names)
    _, c_acc = acc.run_with_cache(ids.to(dev), names_filter=names)
    same_masks = all(torch.equal(c_acc[n].cpu(), c_cpu[n]) for n in names[:2])
    perr = (c_acc["pattern", 5].cpu().float() - c_cpu["pattern", 5].float()).abs().max().item()
    check("run_with_cache: masks equal, pattern close", same_masks and perr < 1e-4, f"pattern max |Δ| {perr:.2e}")

    cap = acc.generate(PROMPT, max_new_tokens=4, capture=["blocks.3.hook_resid_post"])
    full = cap.captures["blocks.3.hook_resid_post"].tensor()
    check("generate(capture=...) on the device", full.shape[-2] == ids.shape[1] + 3, f"{tuple(full.shape)}")

    b16 = gl.load(device=dev, dtype="bfloat16", progress=False)
    r16 = b16.generate(PROMPT, max_new_tokens=8)
    check("bfloat16 generates", len(r16.token_ids) == 8, repr(r16.text[:50]))

    q8 = gl.load(device=dev, quantize="int8", progress=False)
    r8 = q8.generate(PROMPT, max_new_tokens=8)
    check("int8 weight-only generates", r8.token_ids[:4] == a.token_ids[:4], repr(r8.text[:50]))

    demo_cpu = gl.load("demo-multimodal", progress=False)
    demo_acc = gl.load("demo-multimodal", device=dev, progress=False)
    picture = Image.new("RGB", (64, 48), (200, 30, 30))
    x = demo_cpu.processor("<start_of_image> Describe:", images=[picture])
    l_cpu = demo_cpu(x).logits
    l_acc = demo_acc(x.to(dev)).logits.cpu()
    ierr = (l_acc - l_cpu).abs().max().item()
    check("image prompt (untrained demo tower) vs CPU", ierr < 5e-3, f"{x.input_ids.shape[1]} slots, max |Δ| {ierr:.2e}")

    print(f"{len(FAILED)} failed in {time.perf_counter() - t0:.0f} s" + (f": {', '.join(FAILED)}" if FAILED else ""))
    return 1 if FAILED else 0


if __name__ == "__main__":
    sys.exit(main())
