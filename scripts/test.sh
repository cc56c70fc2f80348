#!/usr/bin/env bash
# One command: set up .venv, then ruff, the documentation build and the whole test suite
# (what CI runs).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup.sh --torch  # the interop tests compare against PyTorch itself
.venv/bin/ruff check factorize experiments tests
bash scripts/docs.sh   # the API reference builds with no warning (mkdocs --strict)
# Two workers (the machines have 2 cores); a test file stays on one worker so its fixtures run once.
exec .venv/bin/python -m pytest -q -n 2 --dist loadfile --durations=25 "$@"
