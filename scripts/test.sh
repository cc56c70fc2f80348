#!/usr/bin/env bash
# One command: set up .venv and run the whole test suite (what CI runs).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup.sh --torch  # the interop tests compare against PyTorch itself
.venv/bin/ruff check factorize experiments tests
# Two workers (the machines have 2 cores); a test file stays on one worker so its fixtures run once.
exec .venv/bin/python -m pytest -q -n 2 --dist loadfile "$@"
