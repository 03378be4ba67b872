#!/usr/bin/env bash
# The whole test suite from a fresh clone: venv, dev requirements, Chromium for the browser
# tests, then pytest over everything (unit, real-weight parity, browser, notebooks).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh dev
if ! command -v chromium >/dev/null 2>&1; then
  echo "installing Debian's chromium for the browser tests" >&2
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
    || echo "warning: could not install chromium; browser tests will fail" >&2
fi
exec .venv/bin/python -m pytest -q "$@"
