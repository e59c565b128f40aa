#!/usr/bin/env bash
# GPU check of the serving maths, one prepared script for a machine with a GPU (well inside 10 minutes).
#
#   loadtest/gpu_check.sh [--bundle DIR --ckpt DIR] [--budget S]      (from the repository root)
#
# Reports which ONNX Runtime providers really run (session.get_providers()), parity of the user
# tower and the all-tag scores GPU vs CPU, and users/s of user tower + scoring at batch 1..4096;
# when onnxruntime has no usable CUDA provider, times the same towers in PyTorch on CUDA and says so.
# Without --bundle it builds a small model first (synthetic data, 1 epoch, export: about 1-2 min).
# Output: the log on stdout, the JSON report in $OUT/gpu_check.json (or /tmp/gpu_check.json).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-}
if [ -z "$PY" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
OUTDIR=${OUT:-/tmp}
mkdir -p "$OUTDIR"
echo "== machine"; nproc; if command -v nvidia-smi >/dev/null; then nvidia-smi 2>&1 | head -20; else echo "no nvidia-smi"; fi
echo "== python: $PY"; "$PY" -c "import sys; print(sys.version)"
for m in numpy onnxruntime torch onnx onnxscript fastapi pyarrow; do
  "$PY" -c "import $m; print('$m', $m.__version__)" 2>/dev/null || echo "$m: not installed"
done
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
# 1. the tower's maths on the GPU (about 2 min); 2. tower + scoring + TopK at 1,780 / 100k / 1M tags,
# batch 1, 16, 256, and the service at c=32 with the CUDA provider (about 5 min: the 1M export's parity
# gate and ONNX export dominate). Results also under docs/results/ (gpu_check*.json, gpu_catalogue.txt).
WORK=${MVKE_GPU_WORK:-/tmp/mvke-gpu-check}
RESULTS=docs/results
mkdir -p "$RESULTS"
timeout 200 "$PY" -m loadtest.gpu_check --work "$WORK" --budget 0.5 --json "$OUTDIR/gpu_check.json" "$@"
rc=$?
[ $rc -eq 124 ] && echo "gpu_check: timed out after 200 s"
echo "== tower + scoring + TopK against catalogue size"
timeout 360 "$PY" -m loadtest.gpu_catalogue --ckpt "$WORK/ck" --data "$WORK/syn" --work "$WORK" \
  --tags "${MVKE_GPU_TAGS:-1780,100000,1000000}" --json "$OUTDIR/gpu_catalogue.json" | tee "$OUTDIR/gpu_catalogue.txt"
rc2=${PIPESTATUS[0]}
[ "$rc2" -eq 124 ] && echo "gpu_catalogue: timed out after 360 s"
cp "$OUTDIR"/gpu_check.json "$OUTDIR"/gpu_catalogue.json "$OUTDIR"/gpu_catalogue.txt "$RESULTS"/ 2>/dev/null
[ $rc -ne 0 ] && exit $rc
exit "$rc2"
