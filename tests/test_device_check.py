"""scripts/device_check.py is what a session lent a GPU runs; here it runs on the CPU against itself,
so the script is known to work before any device time is spent on it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "device_check.py"


@pytest.mark.real
def test_device_check_passes_on_the_cpu(real_model):
    out = subprocess.run([sys.executable, str(SCRIPT), "--device", "cpu"], capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout + out.stderr
    lines = out.stdout.splitlines()
    assert sum(line.startswith("ok ") for line in lines) == 8 and lines[-1].startswith("0 failed")
