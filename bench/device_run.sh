#!/usr/bin/env bash
# One device call: the GPU tests, the geometric verifier's GPU check (bench/geometry_gpu.py) and the benchmark
# matrix (bench/matrix.py), each bounded, results in $OUT/results/ (written as they come: a call cut short keeps
# what finished) and the log in $OUT/device_run.log.
# Usage on the GPU machine, repo root: bash bench/device_run.sh [MODELS] [PRECISIONS] [SIZES]
# Environment: STEP_S, GPU_TESTS_S, GEOMETRY_S (seconds per step; GEOMETRY_S= or GPU_TESTS_S= skips it),
# GPU_TESTS_K (pytest -k), GEOMETRY_ARGS, ROMA_SIZES, REBUILDS_FOR (model:precision pairs that run the
# twelve-matchers check; default demo:fp16), BASELINE (NAME=VALUE,... options of a before/after run of
# BASELINE_MODEL (default demo) in fp16 at BASELINE_SIZES, tagged _baseline), LOG (the log file; several calls
# can share $OUT), BEFORE_TREE (an older checkout's package and bench/: the fp16 cells of BEFORE_MODELS, default
# "demo roma", tagged _before, for a before/after on one card; RoMa at 1920x1080 only; and its
# bench/geometry_gpu.py after this checkout's).
set -uo pipefail
OUT=${OUT:-/tmp/out}; RAW=$OUT/results; mkdir -p "$OUT" "$RAW"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
exec > >(tee "${LOG:-$OUT/device_run.log}") 2>&1
MODELS=${1:-demo,full,roma}; PRECISIONS=${2:-fp16,fp32}; SIZES=${3:-640x480,848x480,832x832,1024x768,1280x720,1920x1080}
date -u; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'host kernels',
torch.backends.cpu.get_cpu_capability())"
step() {  # step SECONDS CMD...: bounded and timed; a failure does not stop the others
  local lim=$1; shift; echo "=== $*"; local t0=$SECONDS
  timeout "$lim" "$@" 2>&1 | grep -v -E "Warning|warnings.warn" || echo "!!! FAILED or timed out: $*"
  echo "--- $(( SECONDS - t0 )) s"
}
if [ -n "${BEFORE_TREE:-}" ]; then  # the fixtures and the bundled model from this checkout (to carry less)
  mkdir -p "$BEFORE_TREE/test"
  [ -e "$BEFORE_TREE/test/fixtures" ] || ln -s "$PWD/test/fixtures" "$BEFORE_TREE/test/fixtures"
  [ -e "$BEFORE_TREE/matchanything_ros/data" ] || ln -s "$PWD/matchanything_ros/data" "$BEFORE_TREE/matchanything_ros/data"
fi
# the verifier's benchmark first: its compilations land in Inductor's on-disk cache, which the tests then reuse
# shellcheck disable=SC2086  # GEOMETRY_ARGS: several arguments
[ -n "${GEOMETRY_S-240}" ] && step "${GEOMETRY_S:-240}" python3 bench/geometry_gpu.py ${GEOMETRY_ARGS:-}
if [ -n "${BEFORE_TREE:-}" ] && [ -n "${GEOMETRY_S-240}" ]; then  # the older checkout's verifier, on this card
  # shellcheck disable=SC2086
  step "${GEOMETRY_S:-240}" env PYTHONPATH="$BEFORE_TREE" python3 "$BEFORE_TREE/bench/geometry_gpu.py" ${GEOMETRY_ARGS:-}
fi
[ -n "${GPU_TESTS_S-300}" ] && step "${GPU_TESTS_S:-300}" python3 -m pytest test/test_gpu.py -m gpu -q -p no:cacheprovider \
  -k "${GPU_TESTS_K:-}"
for model in ${MODELS//,/ }; do
  for precision in ${PRECISIONS//,/ }; do
    rebuilds=--no-rebuilds
    [[ ",${REBUILDS_FOR:-demo:fp16}," == *",$model:$precision,"* ]] && rebuilds=
    step "${STEP_S:-200}" python3 bench/matrix.py --out "$RAW/$model" --models "$model" --precisions "$precision" \
      --sizes "$([ "$model" = roma ] && echo "${ROMA_SIZES:-640x480,1920x1080}" || echo "$SIZES")" --runs 10 $rebuilds
  done
done
if [ -n "${BASELINE:-}" ]; then
  options=(); for o in ${BASELINE//,/ }; do options+=(--option "$o"); done
  step "${STEP_S:-200}" python3 bench/matrix.py --out "$RAW/${BASELINE_MODEL:-demo}" --models "${BASELINE_MODEL:-demo}" \
    --precisions fp16 --no-rebuilds \
    --sizes "${BASELINE_SIZES:-848x480,1280x720,1920x1080}" --runs 10 --tag _baseline "${options[@]}"
fi
if [ -n "${BEFORE_TREE:-}" ]; then  # the same cells from an older checkout of bench/ and the package, on this card
  for model in ${BEFORE_MODELS:-demo roma}; do
    step "${STEP_S:-200}" env PYTHONPATH="$BEFORE_TREE" python3 "$BEFORE_TREE/bench/matrix.py" --out "$RAW/$model" \
      --models "$model" --precisions fp16 --no-rebuilds --runs 10 --tag _before \
      --sizes "$([ "$model" = roma ] && echo 1920x1080 || echo "${BASELINE_SIZES:-848x480,1280x720,1920x1080}")"
  done
fi
date -u
