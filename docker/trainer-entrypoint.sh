#!/bin/sh
# One-shot demo pipeline of the trainer image (docker-compose service `trainer`).
#
# If Redis already has an active model version, print it and exit 0 (nothing to do:
# a second `docker compose up` is fast and keeps the published model). Otherwise
# `mvke pipeline` (mvke/pipeline.py): data synth -> train -> export -> features load -> publish
#
# With arguments, runs them instead (e.g. `docker compose run --rm trainer mvke models`).
#
# Environment:
#   REDIS_URL          Redis holding models and the feature store (required)
#   MVKE_WORK_DIR      where data, checkpoint and bundle go (default /data)
#   MVKE_DEMO_USERS    synthetic users (default 5000)
#   MVKE_DEMO_EPOCHS   training epochs (default 2)
#   MVKE_DEMO_MODEL    model to train (default mvke-mt)
#   MVKE_DEMO_SEED     data and training seed (default 0)
#   MVKE_FORCE_TRAIN   1: train and publish a new version even if one is active
set -eu

if [ "$#" -gt 0 ]; then
    exec "$@"
fi

: "${REDIS_URL:?REDIS_URL must be set}"
WORK_DIR=${MVKE_WORK_DIR:-/data}
USERS=${MVKE_DEMO_USERS:-5000}
EPOCHS=${MVKE_DEMO_EPOCHS:-2}
MODEL=${MVKE_DEMO_MODEL:-mvke-mt}
SEED=${MVKE_DEMO_SEED:-0}
FORCE=${MVKE_FORCE_TRAIN:-0}

log() { echo "trainer: $*"; }

# `mvke models` exits 0 and ends with "active: <version>" or "active: none";
# any other failure (Redis unreachable...) stops the job, and so the service.
models=$(mvke models --redis "$REDIS_URL")
active=$(printf '%s\n' "$models" | sed -n 's/^active: *//p' | tail -n 1)
if [ -z "$active" ]; then
    log "could not read the active version from 'mvke models':"
    printf '%s\n' "$models"
    exit 1
fi
if [ "$active" != "none" ] && [ "$FORCE" != "1" ]; then
    log "active model version $active is already published; nothing to do (MVKE_FORCE_TRAIN=1 retrains)"
    exit 0
fi

RUN_DIR="${WORK_DIR:?}/demo"
rm -rf "$RUN_DIR"
mkdir -p "$RUN_DIR"

log "mvke pipeline: $USERS synthetic users -> $MODEL ($EPOCHS epochs) -> export -> publish ${REDIS_URL##*@} -> features"
mvke pipeline --data-source synth --users "$USERS" --model "$MODEL" --epochs "$EPOCHS" --seed "$SEED" \
    --work "$RUN_DIR" --redis "$REDIS_URL"
log "done"
mvke models --redis "$REDIS_URL"
