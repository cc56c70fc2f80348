#!/usr/bin/env bash
# Builds the documentation site (docs/ and the API reference from the docstrings, mkdocs.yml)
# and fails on any warning. The site goes to a temporary directory that is removed afterwards;
# `bash scripts/docs.sh DIR` keeps it in DIR instead.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
out=${1:-}
if [ -z "$out" ]; then
  out=$(mktemp -d)
  trap 'rm -rf "$out"' EXIT
fi
.venv/bin/mkdocs build --strict --quiet --site-dir "$out"
echo "docs: built without warnings"
