#!/usr/bin/env bash
# Create .venv if needed and install the requirements ("dev" adds the test-only ones), every
# version pinned by constraints.txt. pip (not uv) so the torch pin finds the CPU build on this
# machine's disk. pip's own output (this machine's pip.conf makes it chatty) goes to
# .venv/setup.log; on failure its tail is printed.
set -euo pipefail
cd "$(dirname "$0")/.."
want=${1:-runtime}
reqs=requirements.txt; [ "$want" = dev ] && reqs=requirements-dev.txt
log=.venv/setup.log

run() {  # run "what" cmd...: one line for the user, everything else to the log
  local what=$1; shift
  echo "setup: $what"
  if ! "$@" >>"$log" 2>&1; then
    echo "setup: FAILED while $what; the last lines of $log:" >&2
    tail -n 25 "$log" >&2
    exit 1
  fi
}

if [ ! -x .venv/bin/python ]; then
  mkdir -p .venv && : >"$log"
  run "creating .venv" python3 -m venv .venv
fi
# The stamp holds a hash of everything the install depends on: any change reinstalls.
stamp=".venv/.installed-$want"
inputs=$(cat "$reqs" requirements.txt constraints.txt pyproject.toml | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$inputs" ]; then
  echo "---- $(date -u '+%F %T') setup $want" >>"$log"
  run "installing the locked pip" .venv/bin/python -m pip install --upgrade pip -c constraints.txt
  run "installing $reqs pinned by constraints.txt (log: $log)" \
    .venv/bin/python -m pip install -r "$reqs" -c constraints.txt
  run "installing gemma3_lab itself (editable)" .venv/bin/python -m pip install --no-deps -e .
  echo "$inputs" >"$stamp"
fi
