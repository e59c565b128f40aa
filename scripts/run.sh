#!/usr/bin/env bash
# The main job on a fresh machine: set up .venv, generate demo data, train MVKE,
# export, publish, load the feature store and serve on port 8000 (Ctrl-C stops).
# Without REDIS_URL it runs a private redis-server of its own (never one it merely
# finds answering). A second run reuses everything and starts in seconds.
# See scripts/quickstart.py for the sizes and the environment it reads.
set -euo pipefail
cd "$(dirname "$0")/.."
# Only what the main job needs (no load-test, batch or dev tools): MVKE_EXTRAS=all installs everything.
MVKE_EXTRAS=${MVKE_EXTRAS:-demo} bash scripts/setup.sh
export MVKE_SETUP_SECONDS=$SECONDS
exec .venv/bin/python scripts/quickstart.py "$@"
