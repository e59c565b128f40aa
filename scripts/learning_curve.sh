#!/usr/bin/env bash
# Issue 27's learning curve in the background: one size after another, each in a fresh driver process
# (so it runs the code of the moment it starts), niced, one torch thread; resumable: rerun the same
# command and finished runs (cells) are kept. Progress: $MVKE_LC_DATA/driver.log (default /work/data/lc).
#   setsid nohup bash scripts/learning_curve.sh [USERS ...] >/dev/null 2>&1 &
# LC_SEEDS=N: N seeds per size instead of the plan's (extra seeds where the budget allows).
set -u
cd "$(dirname "$0")/.."
PY=${PYTHON:-/work/main/.venv/bin/python}
export PYTHONPATH=$PWD OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 MVKE_LC_DATA=${MVKE_LC_DATA:-/work/data/lc}
mkdir -p "$MVKE_LC_DATA"
echo "[$(date -u +%FT%TZ)] driver pid $$ sizes: ${*:-80000 320000 1280000}" >> "$MVKE_LC_DATA/driver.log"
for users in "${@:-80000 320000 1280000}"; do
  for u in $users; do
    nice -n 19 "$PY" -m mvke.training.learning_curve run --sizes "$u" ${LC_SEEDS:+--seeds "$LC_SEEDS"} || { echo "[$(date -u +%FT%TZ)] size $u failed" >> "$MVKE_LC_DATA/driver.log"; exit 1; }
  done
done
echo "[$(date -u +%FT%TZ)] driver done" >> "$MVKE_LC_DATA/driver.log"
