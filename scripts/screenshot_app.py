"""Refresh the app's pictures from the app in headless Chromium: the README's docs/app.png,
and the first screen at 1440×900 and 800×900 (docs/app_1440.png, docs/app_800.png: a link
fills the prompt, Ctrl+Enter generates, then a token is inspected and the attention view hovered).

    .venv/bin/python scripts/screenshot_app.py

docs/app.png comes from the browser test that generates both columns and inspects a token, with
$GEMMA3_LAB_SCREENSHOT pointing at it (the test suite writes its screenshot to a temporary
folder, so running the tests never changes the checkout). Exits non-zero if anything failed.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PICTURE = ROOT / "docs" / "app.png"
TEST = "tests/test_app_browser.py::test_generate_click_a_token_and_inspect"


def first_screens(widths=(1440, 800)) -> None:
    """docs/app_<width>.png: the page as it opens from a link, after Ctrl+Enter, a token inspected."""
    import shutil
    import socket
    import time

    from playwright.sync_api import sync_playwright

    sys.path.insert(0, str(ROOT))
    from gemma3_lab.app.ui import build_app

    demo = build_app()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    url = f"http://127.0.0.1:{port}/?prompt=The+capital+of+France+is&b_precision=int8"
    try:
        with sync_playwright() as p:
            b = p.chromium.launch(executable_path=shutil.which("chromium"),
                                  args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"])
            for w in widths:
                page = b.new_page(viewport={"width": w, "height": 900})
                page.goto(url)
                page.locator("#prompt textarea").wait_for()
                page.wait_for_function("document.querySelector('#prompt textarea').value.length > 0")
                page.locator("#prompt textarea").press("Control+Enter")
                page.wait_for_function("['A', 'B'].every(c => document.querySelector('#status-' + c)"
                                       ".innerText.includes('in all'))", timeout=300_000)
                page.locator("#tokens-A .tok").nth(3).click()
                page.wait_for_function("document.querySelector('#insp-header').innerText.includes('step 3')",
                                       timeout=60_000)
                page.locator("#insp-attention .strip").first.locator(".tok").nth(5).hover()
                time.sleep(1)
                page.evaluate("window.scrollTo(0, 0)")
                page.screenshot(path=str(ROOT / "docs" / f"app_{w}.png"))
                print(f"wrote docs/app_{w}.png; check it, then commit it")
                page.close()
            b.close()
    finally:
        demo.close()


def main() -> int:
    PICTURE.parent.mkdir(exist_ok=True)
    env = {**os.environ, "GEMMA3_LAB_SCREENSHOT": str(PICTURE)}
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", TEST], cwd=ROOT, env=env)
    if done.returncode == 0:
        print(f"wrote {PICTURE.relative_to(ROOT)}; check it, then commit it")
        first_screens()
    else:
        print(f"error: the browser test failed (exit {done.returncode}); {PICTURE.relative_to(ROOT)} may be unchanged",
              file=sys.stderr)
    return done.returncode


if __name__ == "__main__":
    sys.exit(main())
