"""The set-up: constraints.txt pins every package of the venv the tests run in, every requirement is
pinned by it, and scripts/setup.sh keeps pip's chatter in its log and says what failed."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+)$")


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def lock() -> dict[str, str]:
    lines = [s for s in (ROOT / "constraints.txt").read_text().splitlines() if s and not s.startswith("#")]
    bad = [s for s in lines if not PIN.match(s)]
    assert not bad, f"constraints.txt: not an exact `name==version` pin: {bad}"
    return {canonical(PIN.match(s)[1]): PIN.match(s)[2] for s in lines}


def requirement_names(path: Path) -> set[str]:
    names = set()
    for line in path.read_text().splitlines():
        line = line.split("#")[0].strip()
        if line and not line.startswith("-r"):
            names.add(canonical(re.match(r"[A-Za-z0-9._-]+", line)[0]))
    return names


def test_the_lock_is_the_venv_the_tests_run_in():
    """`pip freeze --all --exclude-editable` of this venv equals the lock (read here from the
    installed distributions, which is what pip freeze lists). Fails after a requirement is added
    without `bash scripts/lock.sh`, or in a venv that scripts/setup.sh did not build.
    Read from the venv's site-packages alone: once torch.compile has run in this process,
    setuptools' vendored copies (packaging, platformdirs, ...) are on sys.path as well."""
    site = [p for p in sys.path if p.endswith("site-packages") and Path(p).resolve().is_relative_to(Path(sys.prefix).resolve())]
    installed = {canonical(d.metadata["Name"]): d.version for d in metadata.distributions(path=site)}
    installed.pop("gemma3-lab")  # the editable project itself
    assert installed == lock()


def test_every_requirement_is_pinned_by_the_lock():
    names = requirement_names(ROOT / "requirements.txt") | requirement_names(ROOT / "requirements-dev.txt")
    assert "hypothesis" in names and "torch" in names
    assert names - lock().keys() == set()


def test_setup_keeps_pip_output_in_its_log_and_prints_its_tail_on_failure(tmp_path):
    """A requirement that cannot be found: one line per phase, pip's output only in .venv/setup.log
    (none of this machine's 'WARNING: Location ... is ignored'), the log's tail on stderr, exit 1."""
    (tmp_path / "scripts").mkdir()
    shutil.copy(ROOT / "scripts" / "setup.sh", tmp_path / "scripts")
    shutil.copy(ROOT / "constraints.txt", tmp_path)
    (tmp_path / "requirements.txt").write_text("gemma3-lab-no-such-package==1.0\n")
    (tmp_path / "pyproject.toml").write_text("")
    out = subprocess.run(["bash", "scripts/setup.sh"], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert out.returncode == 1
    phases = out.stdout.splitlines()
    assert phases == ["setup: creating .venv", "setup: installing the locked pip",
                      "setup: installing requirements.txt pinned by constraints.txt (log: .venv/setup.log)"]
    assert out.stderr.startswith("setup: FAILED while installing requirements.txt")
    assert "gemma3-lab-no-such-package==1.0" in out.stderr.splitlines()[-1]  # pip's last words, from the log
    log = (tmp_path / ".venv" / "setup.log").read_text()
    assert "No matching distribution found for gemma3-lab-no-such-package" in log
    assert "WARNING" not in out.stdout
