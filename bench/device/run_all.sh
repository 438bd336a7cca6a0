#!/usr/bin/env bash
# One device call that checks and times everything GPU-side (the session's GPU time is scarce).
# Run from the repo root on the GPU machine. Everything lands in $OUT/results.tar.gz (+ run_all.log).
# Needs .device/ carried: wheels/ (pillow, pycuda sdist + deps) (the fixtures are in the repository: test/fixtures/reference).
set -uo pipefail
OUT=${OUT:-/tmp/out}; RAW=/tmp/device_results; mkdir -p "$OUT" "$RAW"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 MATCHANYTHING_REFERENCE_DIR=${MATCHANYTHING_REFERENCE_DIR:-$PWD/test/fixtures/reference}
exec > >(tee "$OUT/run_all.log") 2>&1
date -u; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
python3 -m pip install -q --no-index --no-deps .device/wheels/pillow-*.whl 2>&1 | tail -1
# pycuda builds from its sdist (~2.5 min): in the background while the torch runs go
( bash bench/device/build_pycuda.sh > "$RAW/pycuda_build.log" 2>&1; echo "rc=$?" >> "$RAW/pycuda_build.log" ) &
BUILD_PID=$!
rc=0
step() {  # step SECONDS CMD...: bounded, timed, a failure does not stop the others
  local lim=$1; shift; echo "=== $*"; local t0=$SECONDS
  timeout "$lim" "$@" || { echo "!!! FAILED or timed out (rc=$?): $*"; rc=1; }
  echo "--- $(( SECONDS - t0 )) s"
}
step 210 python3 bench/device/eloftr_gpu.py --out "$RAW"
wait $BUILD_PID; tail -3 "$RAW/pycuda_build.log"
step 60 python3 bench/device/pycuda_stream_check.py --out "$RAW"
step 150 python3 bench/device/roma_gpu.py --out "$RAW"
step 120 python3 bench/device/engines_gpu.py --out "$RAW"
tar -C "$RAW" -czf "$OUT/results.tar.gz" .
date -u
exit $rc
