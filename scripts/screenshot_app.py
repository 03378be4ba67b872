"""Refresh the README's picture, docs/app.png, from the app in headless Chromium.

    .venv/bin/python scripts/screenshot_app.py

It runs the browser test that generates both columns and inspects a token, with
$GEMMA3_LAB_SCREENSHOT pointing at docs/app.png (the test suite writes its screenshot to a
temporary folder, so running the tests never changes the checkout). Exits as pytest does.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PICTURE = ROOT / "docs" / "app.png"
TEST = "tests/test_app_browser.py::test_generate_click_a_token_and_inspect"


def main() -> int:
    PICTURE.parent.mkdir(exist_ok=True)
    env = {**os.environ, "GEMMA3_LAB_SCREENSHOT": str(PICTURE)}
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", TEST], cwd=ROOT, env=env)
    if done.returncode == 0:
        print(f"wrote {PICTURE.relative_to(ROOT)}; check it, then commit it")
    else:
        print(f"error: the browser test failed (exit {done.returncode}); {PICTURE.relative_to(ROOT)} may be unchanged",
              file=sys.stderr)
    return done.returncode


if __name__ == "__main__":
    sys.exit(main())
