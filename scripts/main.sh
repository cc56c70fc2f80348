#!/usr/bin/env bash
# One command: set up .venv, then run the main job: accuracy against MACs on digits, every family,
# two seeds (34 runs, ≈ 2–5 min on 2 CPU cores). It writes runs/digits/ (git-ignored; a rerun
# resumes it) and ends with its table beside the committed reference results/digits/ and whether
# the two agree. `bash scripts/main.sh --refresh-reference` also copies the run over the reference.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup.sh
exec .venv/bin/python experiments/accuracy_vs_flops.py "$@"
