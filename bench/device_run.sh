#!/usr/bin/env bash
# One device call: the benchmark matrix (bench/matrix.py) and the geometric verifier's GPU check
# (bench/geometry_gpu.py), each bounded, results in $OUT/results.tar.gz and the log in $OUT/device_run.log.
# Usage on the GPU machine, repo root: bash bench/device_run.sh [MODELS] [PRECISIONS] [SIZES]
set -uo pipefail
OUT=${OUT:-/tmp/out}; RAW=/tmp/device_results; mkdir -p "$OUT" "$RAW"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
exec > >(tee "$OUT/device_run.log") 2>&1
MODELS=${1:-demo,full,roma}; PRECISIONS=${2:-fp16,fp32}; SIZES=${3:-640x480,848x480,832x832,1024x768,1280x720,1920x1080}
date -u; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'host kernels',
torch.backends.cpu.get_cpu_capability())"
step() {  # step SECONDS CMD...: bounded and timed; a failure does not stop the others
  local lim=$1; shift; echo "=== $*"; local t0=$SECONDS
  timeout "$lim" "$@" 2>&1 | grep -v -E "Warning|warnings.warn" || echo "!!! FAILED or timed out: $*"
  echo "--- $(( SECONDS - t0 )) s"
}
step "${GPU_TESTS_S:-300}" python3 -m pytest test/test_gpu.py -m gpu -q -p no:cacheprovider
[ -n "${GEOMETRY_S:-60}" ] && step "${GEOMETRY_S:-60}" python3 bench/geometry_gpu.py
for model in ${MODELS//,/ }; do
  for precision in ${PRECISIONS//,/ }; do
    step "${STEP_S:-200}" python3 bench/matrix.py --out "$RAW/$model" --models "$model" --precisions "$precision" \
      --sizes "$([ "$model" = roma ] && echo "${ROMA_SIZES:-640x480,1280x720}" || echo "$SIZES")" --runs 10
  done
done
tar -C "$RAW" -czf "$OUT/results.tar.gz" .
date -u
