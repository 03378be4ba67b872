"""The web app through `gradio_client` on a local server, against references measured in
the same run on the real bundled Gemma 3 270M:

  * Generate both columns (same model, 24 tokens) against one column alone (the library's
    `generate` with the app's capture): target ≤ 1.3×; and when B's first token arrives
    after A's, in decode steps: target ≤ 1;
  * the latency of /inspect, /mask_atlas, /inspect_figures, /compare and /image_attention at
    ~20 and ~1,000 tokens, each as a multiple of one plain forward of that sequence: target for
    /inspect ≤ 0.1× at 1,000;
  * image uploads (one past the decode budget, four sessions under it): the server's memory;
  * a long prompt (--long tokens, default 8,192): the server's memory before, at the peak and
    after, and the time from /stop to the end of the request (the prefill runs in chunks).

    .venv/bin/python bench/bench_app.py [--long 8192] [--skip-long] [--skip-uploads] [--only uploads|both]

Timings on a shared CPU are noisy: the load average is printed with the numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import threading
import time
from pathlib import Path

import psutil
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gemma3_lab.app.ui import ModelRegistry, build_app  # noqa: E402
from gemma3_lab.app.ui.capture_store import NAMES, from_result  # noqa: E402
from gemma3_lab.app.ui.settings import build_prompt  # noqa: E402
from gemma3_lab.load import BUNDLED  # noqa: E402

PROMPT = "The capital of France is"
N_NEW = 24


def settings(prompt: str, n: int, model: str = BUNDLED, **extra) -> dict:
    out = {"prompt": prompt, "chat": False, "images": []}
    for c in "ab":
        out.update({f"{c}_model": model, f"{c}_decoding": "greedy", f"{c}_max_new_tokens": n})
    return {**out, **extra}


def timed(fn, repeat: int = 3) -> float:
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def both_against_one(client, model) -> None:
    def one(fast=None):
        res = model.generate(PROMPT, max_new_tokens=N_NEW, stop_ids=(), capture=NAMES, fast=fast)
        from_result(res, model.config)
        return res

    res = one()
    t_one = timed(one, 2)
    t_plain = timed(lambda: one(fast=False), 2)
    print(f"one column with the app's capture: {t_one:.2f} s ({res.decode_path} steps, the tokens recorded after "
          f"the last) against {t_plain:.2f} s with every step on the plain forward, recorded as it runs: "
          f"{t_plain / t_one:.2f}x faster; decode {res.tokens_per_second:.1f} tok/s")
    step = res.decode_seconds / max(len(res.steps) - 1, 1)
    t_both, firsts = _both(client)
    before, model.fast_decode = model.fast_decode, False  # the app's model: every step plain, recorded as it runs
    try:
        t_both_plain, _ = _both(client)
    finally:
        model.fast_decode = before
    print(f"generate both (same model, {N_NEW} tokens): {t_both:.2f} s; one column alone {t_one:.2f} s -> "
          f"{t_both / t_one:.2f}x (target <= 1.3x); with every step on the plain forward {t_both_plain:.2f} s "
          f"({t_both_plain / t_both:.2f}x the fast steps' time)")
    gap = min(firsts)
    print(f"B's first token after A's: {gap * 1000:.0f} ms = {gap / step:.2f} decode steps of {step * 1000:.0f} ms "
          "(target <= 1)")


def _both(client) -> tuple[float, list[float]]:
    """The best of two Generate-both requests (seconds to the last output), and per request
    the time between A's first token and B's."""
    firsts, t_both = [], float("inf")
    for _ in range(2):
        t0 = time.perf_counter()
        job = client.submit(**settings(PROMPT, N_NEW), api_name="/generate")
        seen = {}
        while not job.done():
            outs = job.outputs()
            if outs:
                for col in "AB":
                    if col not in seen and (outs[-1][-1].get(col) or {}).get("tokens"):
                        seen[col] = time.perf_counter()
            time.sleep(0.01)
        job.result()
        t_both = min(t_both, time.perf_counter() - t0)
        firsts.append(abs(seen.get("B", 0) - seen.get("A", 0)))
    return t_both, firsts


def looks(client, model, multimodal, png: str) -> None:
    from gradio_client import handle_file

    for n in (20, 1000):
        prompt = " ".join(["word"] * (n - 2))  # about n tokens with <bos>
        out = client.predict(**settings(prompt, 2), api_name="/generate")[-1]
        T = out["A"]["prompt_tokens"] + 1
        ids = torch.tensor([model.to_inputs(prompt).input_ids[0].tolist() + out["A"]["token_ids"][:1]])
        with torch.no_grad():
            fwd = timed(lambda: model(ids), 2)
        looked = iter(range(T - 2, 0, -1))  # a new position each time: its logit lens is not kept yet
        t_i = timed(lambda: client.predict(column="A", index=None, position=next(looked), layer=5, head=0,
                                           api_name="/inspect"))
        layers = iter(range(18))  # then a layer switch at the same position
        t_l = timed(lambda: client.predict(column="A", index=None, position=T - 2, layer=next(layers), head=0,
                                           api_name="/inspect"))
        t_a = timed(lambda: client.predict(column="A", api_name="/mask_atlas"), 2)
        t_f = timed(lambda: client.predict(column="A", index=None, position=T - 2, layer=5, head=0,
                                           api_name="/inspect_figures"), 2)
        look = client.predict(column="A", index=None, position=T - 2, layer=5, head=-1, api_name="/inspect")
        kb = len(json.dumps(look[8])) / 1024
        t_c = timed(lambda: client.predict(api_name="/compare"), 2)
        print(f"{T} tokens: one forward {fwd:.2f} s; /inspect a new position {t_i:.2f} s = {t_i / fwd:.3f}x, "
              f"another layer {t_l:.2f} s = {t_l / fwd:.3f}x (target <= 0.1x at 1,000; the attention view's "
              f"numbers {kb:.0f} KB, {len(look[8]['positions'])} query rows); /mask_atlas {t_a:.2f} s = "
              f"{t_a / fwd:.3f}x; figures to download (on request) {t_f:.2f} s = {t_f / fwd:.3f}x; "
              f"/compare {t_c:.2f} s = {t_c / fwd:.3f}x")
    for n in (20, 1000):  # an image prompt is 256 soft tokens and more
        prompt = "Describe:" + " word" * max(n - 270, 0)
        out = client.predict(**settings(prompt, 1, model="demo-multimodal", images=[handle_file(png)]),
                             api_name="/generate")[-1]
        T = out["A"]["prompt_tokens"]
        x = multimodal.processor(build_prompt(prompt, False, 1), images=[png])
        with torch.no_grad():
            fwd = timed(lambda: multimodal(x.input_ids, **x.model_kwargs()), 2)
        t = timed(lambda: client.predict(column="A", index=0, image=0, layers="global layers", head=-1,
                                         api_name="/image_attention"), 2)
        print(f"{T} tokens with an image: one forward {fwd:.2f} s; /image_attention {t:.2f} s = {t / fwd:.3f}x")


def anon_rss() -> int:
    """Resident private memory (bytes): RSS less any file pages mapped (a model left mapped,
    `loading.hf._copy_pays`), which count once touched but belong to the page cache."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
    return psutil.Process().memory_info().rss


class Watch:
    """Samples the server's private memory every 50 ms while in the `with` block."""

    def __enter__(self):
        self.samples, self.done = [anon_rss()], threading.Event()
        self.before = self.samples[0]
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        return self

    def _run(self):
        while not self.done.is_set():
            self.samples.append(anon_rss())
            time.sleep(0.05)

    def __exit__(self, *exc):
        self.done.set()
        self.thread.join()

    def line(self, after: int) -> str:
        gib = 2**30
        return (f"server private RSS before {self.before / gib:.2f} GiB, peak {max(self.samples) / gib:.2f} GiB, "
                f"after {after / gib:.2f} GiB")


def uploads(url: str) -> None:
    """Image uploads: a 13000×13000 palette PNG (a few hundred KB, past the decode budget) and four
    sessions each sending a 5000×5000 PNG (under it): the server's memory before, peak, after."""
    from gradio_client import Client, handle_file
    from PIL import Image

    big, mid = "/tmp/bench_app_13000.png", "/tmp/bench_app_5000.png"
    Image.new("P", (13000, 13000), 0).save(big, optimize=True)
    Image.new("RGB", (5000, 5000), (40, 90, 160)).save(mid, optimize=True)
    mm = settings("Describe:", 1, model="demo-multimodal")
    client = Client(url, verbose=False)
    with Watch() as w:
        t = time.perf_counter()
        try:
            client.predict(**{**mm, "images": [handle_file(big)]}, api_name="/generate")
            said = "accepted"
        except Exception as e:  # the app's message
            said = f"refused: {str(e)[:90]}"
        t = time.perf_counter() - t
        time.sleep(2)
    print(f"upload 13000x13000 palette PNG ({os.path.getsize(big) / 1024:.0f} KB): {said} in {t:.2f} s; "
          f"{w.line(anon_rss())}")
    with Watch() as w:
        clients = [Client(url, verbose=False) for _ in range(4)]
        jobs = [c.submit(**{**mm, "images": [handle_file(mid)]}, api_name="/generate") for c in clients]
        for j in jobs:
            j.result()
        for c in clients:  # then back to text, as the four sessions did
            c.predict(**settings(PROMPT, 1), api_name="/generate")
        time.sleep(2)
    print(f"4 sessions x 5000x5000 PNG ({os.path.getsize(mid) / 1024:.0f} KB), then text: {w.line(anon_rss())}")


def long_prompt(client, n: int) -> None:
    """n prompt tokens ("hello " repeated, <bos> first), stopped 20 s into the prefill."""
    client.predict(**settings(PROMPT, 1), api_name="/generate")  # every weight page touched once
    samples: list[int] = []
    done = threading.Event()

    def sample():
        while not done.is_set():
            samples.append(anon_rss())
            time.sleep(0.05)

    before = anon_rss()
    watcher = threading.Thread(target=sample, daemon=True)
    watcher.start()
    job = client.submit(**settings("hello " * (n - 2), 4), api_name="/generate")
    while not job.outputs() or "processing the prompt" not in job.outputs()[-1][0]:
        time.sleep(0.05)
    time.sleep(20)  # well inside the prefill
    t_stop = time.perf_counter()
    client.predict(api_name="/stop")
    out = job.result()[-1]
    t_end = time.perf_counter() - t_stop
    time.sleep(2)
    done.set()
    after = anon_rss()
    gib = 2**30
    print(f"long prompt ({out['A']['prompt_tokens']} tokens, stopped 20 s into the prefill): stop -> request ended in "
          f"{t_end:.2f} s; tokens generated {len(out['A']['token_ids'])}; server private RSS before {before / gib:.2f} GiB, "
          f"peak {max(samples) / gib:.2f} GiB, after {after / gib:.2f} GiB")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--long", type=int, default=8192)
    ap.add_argument("--skip-long", action="store_true")
    ap.add_argument("--skip-uploads", action="store_true")
    ap.add_argument("--only", choices=["uploads", "both"], default=None, help="run one part alone")
    args = ap.parse_args()
    from gradio_client import Client
    from PIL import Image

    demo = build_app(ModelRegistry(root=None), max_prompt_tokens=max(args.long, 4096))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    client = Client(f"http://127.0.0.1:{port}/", verbose=False)
    model = demo.registry.get(BUNDLED).model
    model.tokenizer
    multimodal = demo.registry.get("demo-multimodal").model
    png = "/tmp/bench_app_red.png"
    Image.new("RGB", (64, 48), (200, 30, 30)).save(png)
    print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs; torch threads {torch.get_num_threads()}")
    if args.only == "uploads":
        client.predict(**settings(PROMPT, 1), api_name="/generate")  # every weight page touched once
        uploads(f"http://127.0.0.1:{port}/")
        demo.close()
        return
    both_against_one(client, model)
    if args.only == "both":
        demo.close()
        return
    looks(client, model, multimodal, png)
    if not args.skip_uploads:
        uploads(f"http://127.0.0.1:{port}/")
    if not args.skip_long:
        long_prompt(client, args.long)
    print(f"load average {os.getloadavg()[0]:.1f}")
    demo.close()


if __name__ == "__main__":
    main()
