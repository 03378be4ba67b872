#!/usr/bin/env bash
# Run the explorer on the bundled Gemma 3 270M from a fresh clone.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh runtime
if [ -f app.py ]; then
  exec .venv/bin/python app.py "$@"
fi
exec .venv/bin/python -m gemma3_lab generate "The capital of France is" --show-probs "$@"
