#!/usr/bin/env bash
# One command: set up .venv and run the default experiment (digits, a few minutes on 2 CPU cores).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup.sh
exec .venv/bin/python experiments/demo.py "$@"
