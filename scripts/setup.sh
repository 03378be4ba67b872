#!/usr/bin/env bash
# Create .venv if needed and install the requirements ("dev" adds the test-only ones).
# pip (not uv) so the torch==2.13.0 pin finds the CPU build on this machine's disk.
set -euo pipefail
cd "$(dirname "$0")/.."
want=${1:-runtime}
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
stamp=".venv/.installed-$want"
reqs=requirements.txt; [ "$want" = dev ] && reqs=requirements-dev.txt
if [ ! -f "$stamp" ] || [ "$reqs" -nt "$stamp" ] || [ requirements.txt -nt "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -r "$reqs"
  .venv/bin/python -m pip install -q --no-deps -e .
  touch "$stamp"
fi
