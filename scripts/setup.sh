#!/usr/bin/env bash
# Create .venv with what the project needs (idempotent: a second run only checks a stamp).
# Needs python3 (>= 3.11) with venv and pip; nothing else. Prints one line per step;
# pip's full output goes to .venv/setup.log (its last lines are shown if a step fails).
#
#   bash scripts/setup.sh                    # everything: tests, load test, batch (MVKE_EXTRAS=all)
#   MVKE_EXTRAS=demo bash scripts/setup.sh   # only what the main job needs (scripts/run.sh does this)
#   MVKE_TORCH=gpu bash scripts/setup.sh     # torch with CUDA (GPU training); default cpu
#
# torch: the CPU build from the PyTorch CPU wheel index, as docker/trainer.Dockerfile does
# (on Linux, PyPI's torch wheel depends on several GB of CUDA libraries, even pinned). If
# that index does not answer within MVKE_TORCH_PROBE_S seconds, pip's own configuration
# (mirror, --find-links) is asked for the CPU build, and only then PyPI's torch (with CUDA).
#
# Environment: PYTHON (python3), MVKE_EXTRAS (all | demo | any extras of pyproject.toml),
# MVKE_TORCH (cpu | gpu), MVKE_TORCH_INDEX_URL (https://download.pytorch.org/whl/cpu),
# MVKE_TORCH_PROBE_S (5).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
EXTRAS=${MVKE_EXTRAS:-all}
TORCH_VARIANT=${MVKE_TORCH:-cpu}
TORCH_VERSION=2.13.0
TORCH_INDEX_URL=${MVKE_TORCH_INDEX_URL:-https://download.pytorch.org/whl/cpu}
PROBE_S=${MVKE_TORCH_PROBE_S:-5}
RECBOLE_VERSION=1.2.1
LOG=.venv/setup.log

case "$TORCH_VARIANT" in cpu|gpu) ;; *) echo "setup: MVKE_TORCH must be cpu or gpu, got '$TORCH_VARIANT'" >&2; exit 2 ;; esac
KEY=$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)
stamp() { echo ".venv/.mvke-setup-$1-$TORCH_VARIANT-$KEY"; }
# `all` holds every extra, so it also satisfies a narrower request.
if [[ -f $(stamp "$EXTRAS") || -f $(stamp all) ]]; then
  exit 0
fi

START=$SECONDS
trap 'kill $(jobs -p) 2>/dev/null || true' EXIT   # no heartbeat outlives an interrupted set-up
say() { printf 'setup: %s\n' "$*"; }
step_done() { say "  done in $((SECONDS - $1)) s"; }

# pip with its output in the log; on the terminal only downloads of 1 MB or more (name and
# size) and the install count, so a long first download visibly progresses.
PIP_FILTER='
  /^ *Downloading .*\([0-9.]+ [kMG]B\)$/ {
    unit = $NF; sub(/\)/, "", unit); value = $(NF - 1); sub(/\(/, "", value)
    mb = value * (unit == "kB" ? 0.001 : (unit == "GB" ? 1000 : 1)); total += mb; n++
    name = $2; gsub(/%2B/, "+", name)
    if (mb >= 1) { printf "    downloading %s (%s %s)\n", name, value, unit; fflush() } }
  /^Installing collected packages:/ {
    k = split($0, a, ","); printf "    installing %d packages", k
    if (n) printf " (%d files downloaded, %.0f MB)", n, total
    printf "\n"; fflush() }'
# pip is silent while it unpacks and installs (a minute for torch on 2 cores): say so every 20 s.
heartbeat() {
  local start=$SECONDS
  while sleep 20; do say "  ... $((SECONDS - start)) s, still at it (details: tail -f $LOG)"; done
}
pip_logged() {
  echo "+ pip $*" >>"$LOG"
  heartbeat &
  local beat=$! ok=0
  .venv/bin/python -m pip "$@" 2>&1 | tee -a "$LOG" | awk "$PIP_FILTER" || ok=$?
  kill "$beat" 2>/dev/null; wait "$beat" 2>/dev/null || true
  if [[ $ok != 0 ]]; then
    say "pip failed; the last lines of $LOG:" >&2
    tail -n 25 "$LOG" >&2
    return 1
  fi
}

torch_index_answers() {
  .venv/bin/python - "$TORCH_INDEX_URL" "$PROBE_S" <<'EOF' >>"$LOG" 2>&1
import sys, urllib.request
url, timeout = sys.argv[1].rstrip("/") + "/torch/", float(sys.argv[2])
try:
    urllib.request.urlopen(url, timeout=timeout).close()  # returns after the headers
except Exception as e:  # DNS, refused, timeout, proxy, HTTP error: all mean "not usable now"
    print(f"probe {url}: {e}")
    sys.exit(1)
EOF
}

installed_torch() {
  .venv/bin/python -c "import importlib.metadata as m; print(m.version('torch'))" 2>/dev/null || true
}

install_torch() {
  local have
  have=$(installed_torch)
  if [[ $TORCH_VARIANT == gpu ]]; then
    [[ $have == "$TORCH_VERSION" ]] && { say "  torch $have already installed"; return; }
    say "  torch $TORCH_VERSION from PyPI with its CUDA libraries (several GB the first time)"
    pip_logged install "torch==$TORCH_VERSION"
    return
  fi
  if [[ $(uname -s) != Linux ]]; then  # macOS/Windows wheels on PyPI are CPU builds already
    [[ $have == "$TORCH_VERSION" ]] && { say "  torch $have already installed"; return; }
    pip_logged install "torch==$TORCH_VERSION"
    return
  fi
  [[ $have == "$TORCH_VERSION+cpu" ]] && { say "  torch $have already installed"; return; }
  if torch_index_answers; then
    say "  CPU build from $TORCH_INDEX_URL (about 190 MB the first time)"
    pip_logged install "torch==$TORCH_VERSION+cpu" --extra-index-url "$TORCH_INDEX_URL"
  elif say "  $TORCH_INDEX_URL did not answer within ${PROBE_S} s; asking pip's configured index/find-links for the CPU build" \
       && pip_logged install --retries 1 "torch==$TORCH_VERSION+cpu"; then
    :
  else
    say "  WARNING: no CPU build of torch reachable; installing PyPI's torch $TORCH_VERSION, which brings"
    say "  several GB of CUDA libraries (set MVKE_TORCH_INDEX_URL to a reachable mirror of the CPU index)"
    pip_logged install "torch==$TORCH_VERSION"
  fi
}

say "installing into .venv (extras: $EXTRAS, torch: $TORCH_VARIANT); full log in $LOG"
say "  the first time this downloads about 370 MB (demo) or 540 MB (all) and takes a few minutes:"
say "  README, 'How long the first run takes'"
t=$SECONDS
if [[ ! -x .venv/bin/python ]]; then
  say "[1/4] creating .venv with $("$PY" --version 2>&1)"
  "$PY" -m venv .venv
fi
: >"$LOG"
pip_logged install --upgrade pip
say "[1/4] .venv ready (pip $(.venv/bin/python -m pip --version | cut -d' ' -f2))"

t=$SECONDS
say "[2/4] torch $TORCH_VERSION ($TORCH_VARIANT)"
install_torch
step_done $t

t=$SECONDS
say "[3/4] the project and its dependencies: .[$EXTRAS] (editable)"
pip_logged install -e ".[$EXTRAS]"
step_done $t

t=$SECONDS
if [[ $EXTRAS == all ]]; then
  # MovieLens-100K ships inside recbole; only its data files are used (mvke data ml100k).
  say "[4/4] recbole $RECBOLE_VERSION (MovieLens-100K files only, no dependencies)"
  pip_logged install --no-deps "recbole==$RECBOLE_VERSION"
  step_done $t
else
  say "[4/4] recbole skipped (only \`mvke data ml100k\` needs it; MVKE_EXTRAS=all installs it)"
fi
rm -f .venv/.mvke-setup-*
touch "$(stamp "$EXTRAS")"
say ".venv ready in $((SECONDS - START)) s"
