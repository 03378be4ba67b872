"""Capture cost of gemma3_lab against TransformerLens 4.x and transformers on the real bundled
Gemma 3 270M, side by side in one run:

  * full capture at 512 tokens (every hook point, per-position top-k logits): time and
    capture memory (peak RSS minus RSS after loading), each contender in a fresh process;
    ours also with full logits, with bfloat16 storage, and without any logits (the head's
    262k-row matrix is half of the forward's cost, and per-position top-k needs all of it);
  * all attention patterns of all 18 layers at 8,192 tokens: peak RSS;
  * hooks present but not capturing: overhead over the fast path.

    .venv/bin/python bench/bench_capture.py [--tl-python /tmp/tlvenv/bin/python] [--skip-8k]

TransformerLens is not a dependency: install it in its own environment, one that sees this
venv's torch and transformers through a .pth file (TransformerLens 4.3.0 was used):

    python -m venv /tmp/tlvenv
    .venv/bin/python -c "import site; print(site.getsitepackages()[0])" \
        > /tmp/tlvenv/lib/python3.11/site-packages/main_venv.pth
    /tmp/tlvenv/bin/pip install transformer-lens==4.3.0

Every contender runs with OMP_WAIT_POLICY=PASSIVE
and is timed by wall clock and by process CPU time; with other jobs on the 2 cores the CPU
time is the fairer clock, and the load average is printed with the numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROMPT_FILE = ROOT / "tests" / "data" / "long_prompt.txt"

# Each contender runs in a fresh process and prints one JSON line. The peak-RSS counter is
# reset after loading (clear_refs 5), so loading's own peak does not count as capture memory.
COMMON = textwrap.dedent("""
    import json, os, sys, time, resource
    def rss():
        for line in open("/proc/self/status"):
            if line.startswith("VmRSS"): return int(line.split()[1]) * 1024
    def peak():
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM"): return int(line.split()[1]) * 1024
    def reset_peak():
        with open("/proc/self/clear_refs", "w") as f: f.write("5")
    def clocks():
        return time.perf_counter(), time.process_time()
    def ids_for(n):
        base = json.load(open(sys.argv[3]))  # the same token ids for every contender
        return (base * -(-n // len(base)))[:n]
""")

OURS = COMMON + textwrap.dedent("""
    import torch, gemma3_lab as gl
    torch.set_grad_enabled(False)
    model = gl.load(progress=False)
    n, mode = int(sys.argv[1]), sys.argv[2]
    ids = torch.tensor([ids_for(n)])
    model.run_with_cache(ids[:, :8], return_logits=False)  # warm-up: first-call allocations
    after_load = rss(); reset_peak()
    t, c = clocks()
    if mode == "full":
        logits, cache = model.run_with_cache(ids, return_logits=False, top_k=10)
    elif mode == "full-bf16":
        logits, cache = model.run_with_cache(ids, return_logits=False, top_k=10, dtype=torch.bfloat16)
    elif mode == "full-no-logits":
        logits, cache = model.run_with_cache(ids, return_logits=False, top_k=0)
    elif mode == "full+logits":
        logits, cache = model.run_with_cache(ids, top_k=10)
    elif mode == "patterns-bf16":
        logits, cache = model.run_with_cache(ids, names_filter="blocks.*.attn.hook_pattern", dtype=torch.bfloat16,
                                             return_logits=False, top_k=0)
    elif mode == "patterns-f32":
        logits, cache = model.run_with_cache(ids, names_filter="blocks.*.attn.hook_pattern",
                                             return_logits=False, top_k=0)
    dt, cpu = time.perf_counter() - t, time.process_time() - c
    print(json.dumps(dict(seconds=dt, cpu=cpu, capture_bytes=peak() - after_load, peak=peak(), after_load=after_load,
                          cache_bytes=cache.memory_bytes(), n_tensors=len(cache))))
""")

HF = COMMON + textwrap.dedent("""
    import torch
    from transformers import AutoModelForCausalLM
    torch.set_grad_enabled(False)
    model = AutoModelForCausalLM.from_pretrained(sys.argv[4], dtype=torch.float32, attn_implementation="eager").eval()
    ids = torch.tensor([ids_for(int(sys.argv[1]))])
    model(input_ids=ids[:, :8], output_attentions=True, output_hidden_states=True)
    after_load = rss(); reset_peak()
    t, c = clocks()
    out = model(input_ids=ids, output_attentions=True, output_hidden_states=True)
    dt, cpu = time.perf_counter() - t, time.process_time() - c
    print(json.dumps(dict(seconds=dt, cpu=cpu, capture_bytes=peak() - after_load, peak=peak(), after_load=after_load,
                          n_tensors=len(out.attentions) + len(out.hidden_states))))
""")

TL = COMMON + textwrap.dedent("""
    import torch
    from transformers import AutoModelForCausalLM
    from transformer_lens.model_bridge import TransformerBridge
    torch.set_grad_enabled(False)
    folder = sys.argv[4]
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager").eval()
    bridge = TransformerBridge.boot_transformers(folder, hf_model=hf, device="cpu", dtype=torch.float32)
    ids = torch.tensor([ids_for(int(sys.argv[1]))])
    bridge.run_with_cache(ids[:, :8])
    after_load = rss(); reset_peak()
    t, c = clocks()
    logits, cache = bridge.run_with_cache(ids)
    dt, cpu = time.perf_counter() - t, time.process_time() - c
    print(json.dumps(dict(seconds=dt, cpu=cpu, capture_bytes=peak() - after_load, peak=peak(), after_load=after_load,
                          n_tensors=len(cache))))
""")

OVERHEAD = COMMON + textwrap.dedent("""
    import statistics, torch, gemma3_lab as gl
    torch.set_grad_enabled(False)
    model = gl.load(progress=False)
    ids = torch.tensor([ids_for(int(sys.argv[1]))])
    # "not capturing": a hook that looks and returns nothing, on every point that keeps the
    # fast path (all but patterns/scores); the mask is left out as well, since hooking it
    # hands SDPA an explicit mask instead of its causal flag
    skip = ("hook_pattern", "hook_attn_scores", "hook_mask")
    names = [n for n in model.hook_names() if not n.endswith(skip)]
    resid = [n for n in names if n.endswith(("hook_resid_pre", "hook_resid_mid", "hook_resid_post"))]
    noop = lambda t, hook: None
    plain = lambda: model(ids, logits_to_keep=1)
    def hooked(which):
        def run():
            with model.hooks([(n, noop) for n in which]):
                model(ids, logits_to_keep=1)
        return run
    runs = {"fast": plain, "all": hooked(names), "resid": hooked(resid)}
    for f in runs.values(): f()
    wall, cpu = {k: [] for k in runs}, {k: [] for k in runs}
    for _ in range(int(sys.argv[2])):
        for k, f in runs.items():  # interleaved, so drifting load hits all alike
            t, c = clocks(); f()
            wall[k].append(time.perf_counter() - t); cpu[k].append(time.process_time() - c)
    med = statistics.median
    print(json.dumps({k: med(v) for k, v in wall.items()} | {"cpu_" + k: med(v) for k, v in cpu.items()}
                     | {"n_hooks": len(names)}))
""")


def run(code: str, *args, python: str = sys.executable) -> dict | str:
    """One contender in a fresh process: its JSON line, or the reason it produced none."""
    # on a shared machine spinning OpenMP threads cost several-fold; every contender waits passively
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}
    p = subprocess.run([python, "-c", code, *map(str, args)], capture_output=True, text=True, cwd=ROOT, env=env)
    if p.returncode != 0:
        return (p.stderr.strip().splitlines() or ["no output"])[-1][:300]
    return json.loads(p.stdout.strip().splitlines()[-1])


def gb(n: float) -> str:
    return f"{n / 1e9:5.2f} GB"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--long", type=int, default=8192)
    ap.add_argument("--tl-python", default="/tmp/tlvenv/bin/python")
    ap.add_argument("--skip-8k", action="store_true")
    ap.add_argument("--reps", type=int, default=7)
    a = ap.parse_args()

    import gemma3_lab as gl
    from gemma3_lab.load import bundled_gguf_path
    from gemma3_lab.loading.gguf_convert import cached_conversion

    folder = cached_conversion(bundled_gguf_path(), progress=False)
    ids_file = Path(tempfile.mkdtemp()) / "ids.json"
    ids_file.write_text(json.dumps(gl.load(progress=False).tokenizer.encode(PROMPT_FILE.read_text(), add_bos=True)))
    print(f"load average at start: {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores", flush=True)
    n = a.tokens
    print(f"\n== full capture at {n} tokens (fresh process each; capture memory = peak RSS - RSS after load)")
    ours = {"gemma3_lab (top-k logits)": run(OURS, n, "full", ids_file, folder),
            "gemma3_lab (+ full logits)": run(OURS, n, "full+logits", ids_file, folder),
            "gemma3_lab (top-k, bf16 storage)": run(OURS, n, "full-bf16", ids_file, folder),
            "gemma3_lab (no logits at all)": run(OURS, n, "full-no-logits", ids_file, folder)}
    theirs = {"transformers eager (attn+hidden)": run(HF, n, "-", ids_file, folder)}
    if Path(a.tl_python).exists():
        theirs["TransformerLens bridge"] = run(TL, n, "-", ids_file, folder, python=a.tl_python)
    else:
        theirs["TransformerLens bridge"] = f"not run: no python at {a.tl_python} (install transformer-lens there)"
    for name, r in {**ours, **theirs}.items():
        if isinstance(r, str):
            print(f"  {name:<34} FAILED: {r}")
        else:
            print(f"  {name:<34} wall {r['seconds']:6.2f} s  cpu {r['cpu']:6.2f} s  capture {gb(r['capture_bytes'])}"
                  f"  ({r['n_tensors']} tensors)", flush=True)
    print("  ratios (ours / theirs; cpu = process CPU time of all threads, the fairer clock on shared cores):")
    for o, r in ours.items():
        for t, q in theirs.items():
            if isinstance(r, dict) and isinstance(q, dict):
                print(f"    {o:<34} / {t:<34} wall {r['seconds'] / q['seconds']:5.2f}x  cpu {r['cpu'] / q['cpu']:5.2f}x"
                      f"  memory {r['capture_bytes'] / q['capture_bytes']:5.2f}x")
    print("  targets vs TransformerLens: time <= 0.5x, capture memory <= 0.25x", flush=True)

    if not a.skip_8k:
        print(f"\n== all attention patterns of all layers at {a.long} tokens (peak RSS of the whole process)")
        for mode in ("patterns-bf16", "patterns-f32"):
            r = run(OURS, a.long, mode, ids_file, folder)
            if isinstance(r, str):
                print(f"  {mode:<14} FAILED: {r}")
            else:
                print(f"  {mode:<14} {r['seconds']:7.2f} s  peak RSS {gb(r['peak'])}  (after load {gb(r['after_load'])}, "
                      f"cache {gb(r['cache_bytes'])})   target <= 4 GB", flush=True)

    print(f"\n== hooks present, not capturing, {n} tokens (median of {a.reps}, interleaved)")
    r = run(OVERHEAD, n, a.reps, ids_file)
    if isinstance(r, str):
        print(f"  FAILED: {r}")
    else:
        for clock, pre in (("wall", ""), ("cpu", "cpu_")):
            f, res, al = r[pre + "fast"], r[pre + "resid"], r[pre + "all"]
            print(f"  {clock:<4} fast path {f:.3f} s | no-op hook on every residual point {res:.3f} s "
                  f"({(res / f - 1) * 100:+.1f}%) | on all {r['n_hooks']} non-pattern points {al:.3f} s "
                  f"({(al / f - 1) * 100:+.1f}%)   target <= +3%", flush=True)
    print(f"\nload average at end: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
