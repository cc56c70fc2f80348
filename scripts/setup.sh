#!/usr/bin/env bash
# Sets up a virtual environment in .venv with factorize and its test and docs extras.
# Idempotent: a second run only re-checks the install. Sourced by main.sh and test.sh.
# `setup.sh --torch` (what test.sh runs) also installs PyTorch and torchvision for the interop
# tests; the main job does not need them.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

# Fashion-MNIST from Debian's package (the tests read the real files). Optional for the main job.
if [ ! -d /usr/share/datasets/fashion-mnist ] && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist) >/dev/null \
    || echo "setup: could not install dataset-fashion-mnist (Fashion-MNIST tests will be skipped)" >&2
fi

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip >/dev/null
.venv/bin/python -m pip install -q -e ".[test,docs]"

# PyTorch + torchvision for the interop tests only. Pinned per machine: on x86_64 the CPU-only
# torch 2.13.0 wheel has no torchvision that loads with it ("operator torchvision::nms does not
# exist"), so the (larger) 2.14.1 build is used.
if [ "${1:-}" = "--torch" ]; then
  case "$(uname -m)" in
    aarch64|arm64) TORCH=2.9.1 TORCHVISION=0.24.1 ;;
    *) TORCH=2.14.1 TORCHVISION=0.29.1 ;;
  esac
  if ! .venv/bin/python - "$TORCH" "$TORCHVISION" <<'PY' 2>/dev/null
import sys
import torch, torchvision
ok = (torch.__version__.split("+")[0] == sys.argv[1]
      and torchvision.__version__.split("+")[0] == sys.argv[2])
sys.exit(0 if ok else 1)
PY
  then
    .venv/bin/python -m pip install -q "torch==$TORCH" "torchvision==$TORCHVISION"
  fi
fi
