#!/usr/bin/env bash
# One command: set up .venv and run the default experiment (accuracy vs MACs on digits, ≈ 4 min on 2 CPU cores).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup.sh
exec .venv/bin/python experiments/accuracy_vs_flops.py "$@"
