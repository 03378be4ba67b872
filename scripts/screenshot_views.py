"""Refresh docs/attention_view_1440.png and docs/attention_view_800.png: the browser attention
view and logit-lens table on the bundled 270M, in headless Debian Chromium.

    .venv/bin/python -m scripts.screenshot_views   (or: PYTHONPATH=. .venv/bin/python scripts/screenshot_views.py)

One `run_with_cache` of a short prompt feeds both views (as the app feeds them from its
capture); a token is hovered, then the page is shot at both widths. Check the pictures, then
commit them.
"""

from __future__ import annotations

import shutil
import socket
import sys
from pathlib import Path

import gradio as gr
from playwright.sync_api import sync_playwright

import gemma3_lab as gl
from gemma3_lab.app.ui.attention_view import attention_payload, attention_view, logit_lens_payload, logit_lens_view

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "The capital of France is Paris. The capital of Germany is Berlin. The capital of Italy is"
NAMES = ["blocks.*.attn.hook_pattern", "blocks.0.hook_resid_pre", "blocks.*.hook_resid_post"]
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking"]


def page_for(model) -> gr.Blocks:
    ids = model.to_inputs(PROMPT).input_ids
    _, cache = model.run_with_cache(ids, NAMES)
    text = model.config.text
    tokens = [model.tokenizer.id_to_token(int(i)) for i in ids[0]]
    pats = {i: cache["pattern", i] for i in range(text.num_layers)}
    with gr.Blocks(title="gemma3_lab views") as demo:
        gr.Markdown(f"**Prompt:** {PROMPT}")
        attention_view(attention_payload(tokens, pats, text.layer_types, text.sliding_window), elem_id="attn")
        logit_lens_view(logit_lens_payload(cache.logit_lens(k=5)), elem_id="lens")
    return demo


def main() -> int:
    demo = page_for(gl.load(progress=False))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=shutil.which("chromium"), args=ARGS)
            for width in (1440, 800):
                page = browser.new_page(viewport={"width": width, "height": 1000})
                page.goto(f"http://127.0.0.1:{port}/")
                page.locator("#attn .tok").first.wait_for(timeout=60_000)
                page.locator("#attn select.layer").select_option("5")  # the first global layer
                page.locator("#attn .strip").first.locator(".tok").nth(19).hover()
                page.locator("#lens td.cell").nth(19 * 19 + 12).hover()  # slot 19, L11
                page.locator("#attn .strip").first.locator(".tok").nth(19).click()  # pinned: stays shown
                out = ROOT / "docs" / f"attention_view_{width}.png"
                page.screenshot(path=str(out), full_page=True)
                print(f"wrote {out.relative_to(ROOT)}")
            browser.close()
    finally:
        demo.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
