#!/usr/bin/env bash
# One device call that checks and times everything GPU-side (the session's GPU time is scarce).
# Run from the repo root on the GPU machine; results go to $OUT.
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 MATCHANYTHING_REFERENCE_DIR=${MATCHANYTHING_REFERENCE_DIR:-$PWD/.device/reference}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -m pip install -q --no-index --no-deps .device/wheels/pillow-*.whl 2>&1 | tail -1
# pycuda builds from its sdist (~2.5 min): start it in the background while the torch runs go
( bash bench/device/build_pycuda.sh > "$OUT/pycuda_build.log" 2>&1; echo "rc=$?" >> "$OUT/pycuda_build.log" ) &
BUILD_PID=$!
rc=0
step() { echo "=== $*"; local t0=$SECONDS; "$@" || { echo "!!! FAILED: $*"; rc=1; }; echo "--- $(( SECONDS - t0 )) s"; }
step python3 bench/device/eloftr_gpu.py --out "$OUT"
step python3 bench/device/roma_gpu.py --out "$OUT"
step python3 bench/device/engines_gpu.py --out "$OUT"
wait $BUILD_PID; tail -3 "$OUT/pycuda_build.log"
step python3 bench/device/pycuda_stream_check.py --out "$OUT"
exit $rc
