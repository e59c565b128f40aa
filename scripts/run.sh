#!/usr/bin/env bash
# The main job on a fresh machine: set up .venv, generate demo data, train MVKE,
# export, publish, load the feature store and serve on port 8000 (Ctrl-C stops).
# A second run reuses everything and starts in seconds. See scripts/quickstart.py.
set -euo pipefail
cd "$(dirname "$0")/.."
# Only what the main job needs (no load-test, batch or dev tools): MVKE_EXTRAS=all installs everything.
MVKE_EXTRAS=${MVKE_EXTRAS:-demo} bash scripts/setup.sh
exec .venv/bin/python scripts/quickstart.py "$@"
