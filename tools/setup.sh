#!/usr/bin/env bash
# tools/setup.sh - bare-machine set-up of matchanything_ros (no ROS install needed).
#
# Creates .venv (Python 3.11: PyPI's ROS 2 Kilted wheels are cp311 only), installs the pinned
# requirements/*.txt, points the ROS wheels' CMake exports at this venv, builds and installs the
# package (messages + Python code + share/) with plain cmake into install/ (build dir build/),
# installs the `matchanything` / `matcher_node` console scripts (pip install -e), checks that the
# generated messages import, and touches install/.matchanything_setup_ok.
#
# Idempotent and quick to re-run: pip steps are skipped while the requirement files' hash
# matches a stamp in .venv; the cmake build is incremental. Concurrent runs wait on a lock.
# Afterwards: `. ./env.sh` enters the environment (venv + ROS variables).
#
# Env: MATCHANYTHING_PYTHON  python3.11 to create the venv with (default: found on PATH / pyenv)
# Needs: python3.11 with headers, cmake >= 3.16, a C/C++ compiler, make, flock, sha256sum.
# Facts and workarounds: README.md ("Set-up on a bare machine").
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV=$ROOT/.venv
BUILD=$ROOT/build
INSTALL=$ROOT/install
LOGS=$BUILD/setup-logs
OK_FILE=$INSTALL/.matchanything_setup_ok
REQUIREMENTS=(core ros dev build)        # installed with dependencies, all pinned
REQUIREMENTS_NODEPS=(typecheck-nodeps)   # tensorrt-stubs: its `tensorrt` dependency cannot install here
PIP_STAMP=$VENV/.matchanything-requirements.sha256
EDITABLE_STAMP=$VENV/.matchanything-editable.sha256

mkdir -p "$BUILD" "$LOGS"
# one set-up at a time per checkout (several people / test runs may start it together)
exec 9>"$BUILD/.setup.lock"
if ! flock -n 9; then
  echo "setup: another set-up of $ROOT is running; waiting for it ..."
  flock 9
fi

T_START=$(date +%s.%N)
TIMINGS=()
CUR_STEP=
on_exit() {
  local rc=$?
  if [ "$rc" -ne 0 ]; then
    rm -f "$OK_FILE"
    echo "setup: FAILED${CUR_STEP:+ in step '$CUR_STEP'} (exit $rc)" >&2
  fi
}
trap on_exit EXIT

step() {  # step NAME FUNCTION: run and time one step (errexit stays on inside); say so when it took time
  CUR_STEP=$1
  local t0 t1
  t0=$(date +%s.%N)
  "$2"
  t1=$(date +%s.%N)
  TIMINGS+=("$(awk -v a="$t0" -v b="$t1" -v n="$CUR_STEP" 'BEGIN { printf "  %-22s %6.1f s", n, b - a }')")
  awk -v a="$t0" -v b="$t1" -v n="$CUR_STEP" -v t="$T_START" \
    'BEGIN { if (b - a >= 1) printf "setup: %s done in %.1f s (%.0f s since start)\n", n, b - a, b - t }'
  CUR_STEP=
}

logged_progress() {  # logged_progress NAME REGEX CMD...: like logged, and show the lines matching REGEX as they come
  local log=$LOGS/$1 regex=$2 rc=0
  log=$log.log
  shift 2
  "$@" 2>&1 | tee "$log" | grep --line-buffered -E "$regex" | sed -u 's/^/  | /' || true
  rc=${PIPESTATUS[0]}
  if [ "$rc" -ne 0 ]; then
    echo "---- last lines of $log:" >&2
    tail -n 60 "$log" >&2
    return "$rc"
  fi
}

logged() {  # logged NAME CMD...: run CMD with its output in build/setup-logs/NAME.log; show it on failure
  local log=$LOGS/$1.log
  shift
  if ! "$@" >"$log" 2>&1; then
    echo "---- last lines of $log:" >&2
    tail -n 60 "$log" >&2
    return 1
  fi
}

find_python() {
  local c
  for c in "${MATCHANYTHING_PYTHON:-}" python3.11 "${PYENV_ROOT:-${HOME:-/root}/.pyenv}"/versions/3.11*/bin/python3.11 \
           /usr/local/bin/python3.11 /usr/bin/python3.11; do
    [ -n "$c" ] || continue
    if command -v "$c" >/dev/null 2>&1 && "$c" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))' 2>/dev/null; then
      command -v "$c"
      return 0
    fi
  done
  echo "setup: Python 3.11 not found (PyPI's ROS 2 Kilted wheels are cp311 only); install it or set" \
       "MATCHANYTHING_PYTHON=/path/to/python3.11" >&2
  return 1
}

venv_usable() {  # a venv moved or copied from elsewhere keeps absolute paths in its scripts
  [ -x "$VENV/bin/python" ] && [ -f "$VENV/bin/pip" ] \
    && head -n 1 "$VENV/bin/pip" | grep -qF "#!$VENV/bin/python" \
    && "$VENV/bin/python" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))' 2>/dev/null
}

# ------------------------------------------------------------------------------------------ steps
make_venv() {
  if venv_usable; then
    return 0
  fi
  local py
  py=$(find_python)
  echo "setup: creating $VENV with $py"
  rm -rf "$VENV"
  "$py" -m venv "$VENV"
}

requirements_hash() {
  local f
  {
    "$VENV/bin/python" -c 'import sys; print(sys.version)'
    for f in "${REQUIREMENTS[@]}" "${REQUIREMENTS_NODEPS[@]}"; do
      echo "== $f"
      cat "$ROOT/requirements/$f.txt"
    done
  } | sha256sum | cut -d' ' -f1
}

pip_install() {
  local want args=() f
  want=$(requirements_hash)
  if [ -f "$PIP_STAMP" ] && [ "$(cat "$PIP_STAMP")" = "$want" ]; then
    return 0
  fi
  for f in "${REQUIREMENTS[@]}"; do args+=(-r "$ROOT/requirements/$f.txt"); done
  echo "setup: installing pinned requirements into .venv, a few minutes on a fresh machine (log: ${LOGS#"$ROOT"/}/pip.log) ..."
  # torch comes from the machine's local wheel directory when pip is configured with one
  logged_progress pip '^(Collecting|Downloading|Installing collected|Successfully installed)' \
    "$VENV/bin/python" -m pip install --disable-pip-version-check --progress-bar off "${args[@]}"
  args=()
  for f in "${REQUIREMENTS_NODEPS[@]}"; do args+=(-r "$ROOT/requirements/$f.txt"); done
  logged pip-nodeps "$VENV/bin/python" -m pip install --disable-pip-version-check --no-deps "${args[@]}"
  echo "$want" >"$PIP_STAMP"
}

patch_cmake_exports() {
  # The ROS wheels' exported CMake targets name include dirs of the wheel build host
  # (/opt/python/cp311-cp311/...), and CMake rejects targets whose include dirs do not exist.
  # Point them at this venv's Python headers and NumPy (venv-local, no root needed).
  local files inc npinc
  files=$(grep -rl --include='*.cmake' '/opt/python/cp311-cp311' "$VENV/share" || true)
  [ -n "$files" ] || return 0
  inc=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["include"])')
  npinc=$("$VENV/bin/python" -c 'import numpy; print(numpy.get_include())')
  [ -f "$inc/Python.h" ] || { echo "setup: no Python.h under $inc (install the Python 3.11 headers)" >&2; return 1; }
  echo "$files" | xargs sed -i \
    -e "s#/opt/python/cp311-cp311/include/python3.11#$inc#g" \
    -e "s#/opt/python/cp311-cp311/lib/python3.11/site-packages/numpy/_core/include#$npinc#g"
  if grep -rq --include='*.cmake' '/opt/python/cp311-cp311' "$VENV/share"; then
    echo "setup: unexpected /opt/python paths left in $VENV/share/*/cmake:" >&2
    grep -rl --include='*.cmake' '/opt/python/cp311-cp311' "$VENV/share" >&2
    return 1
  fi
}

build_package() {
  # a build dir configured for another checkout location is useless: start over
  if [ -f "$BUILD/CMakeCache.txt" ] && ! grep -qxF "CMAKE_HOME_DIRECTORY:INTERNAL=$ROOT" "$BUILD/CMakeCache.txt"; then
    find "$BUILD" -mindepth 1 -maxdepth 1 ! -name setup-logs ! -name .setup.lock -exec rm -rf {} +
  fi
  export CMAKE_PREFIX_PATH=$VENV AMENT_PREFIX_PATH=$VENV PATH=$VENV/bin:$PATH
  # CMake refuses to export a target whose include dirs lie in the source tree, and .venv (with
  # NumPy's headers, which the generated Python typesupport uses) lies in it. Paths inside the
  # install prefix are exempt: hand FindPython3 the headers through a link there.
  local npinc
  npinc=$("$VENV/bin/python" -c 'import numpy; print(numpy.get_include())')
  mkdir -p "$INSTALL"
  ln -sfn "$npinc" "$INSTALL/.numpy_include"
  if [ ! -f "$BUILD/.configure_ok" ] || [ ! -f "$BUILD/CMakeCache.txt" ] || [ ! -f "$BUILD/Makefile" ]; then
    rm -f "$BUILD/.configure_ok"
    logged cmake-configure cmake -S "$ROOT" -B "$BUILD" -DCMAKE_INSTALL_PREFIX="$INSTALL" \
      -DPython3_EXECUTABLE="$VENV/bin/python" -DPython3_NumPy_INCLUDE_DIR="$INSTALL/.numpy_include" \
      -DBUILD_TESTING=OFF -DCMAKE_BUILD_TYPE=Release
    touch "$BUILD/.configure_ok"
  fi
  echo "setup: building the messages and the package (cmake; log: ${LOGS#"$ROOT"/}/cmake-build.log) ..."
  logged_progress cmake-build '^\[ *[0-9]+%\] Built target' cmake --build "$BUILD" -j "$(nproc)"
  logged cmake-install cmake --install "$BUILD"
}

pip_editable() {
  # console scripts (matchanything, matcher_node, ...) are declared in setup.py
  local want
  want=$(cat "$ROOT/setup.py" "$PIP_STAMP" | sha256sum | cut -d' ' -f1)
  if [ -f "$EDITABLE_STAMP" ] && [ "$(cat "$EDITABLE_STAMP")" = "$want" ] && [ -x "$VENV/bin/matchanything" ]; then
    return 0
  fi
  logged pip-editable "$VENV/bin/python" -m pip install --disable-pip-version-check --no-deps \
    --no-build-isolation -e "$ROOT"
  echo "$want" >"$EDITABLE_STAMP"
}

check_environment() {
  # the generated messages and our code import together from the environment env.sh gives
  logged check bash -c '. "$1/env.sh" && cd / && python -c "
import matchanything_ros, matchanything_ros.cli
from matchanything_ros.msg import KeypointMatches, MatcherInfo
from rclpy.serialization import deserialize_message, serialize_message
m = KeypointMatches(keypoints0=[1.0, 2.0])
assert list(deserialize_message(serialize_message(m), KeypointMatches).keypoints0) == [1.0, 2.0]
print(matchanything_ros.__version__, MatcherInfo.__module__)
"' _ "$ROOT"
}

step venv make_venv
step "pip requirements" pip_install
step "patch cmake exports" patch_cmake_exports
step "cmake build+install" build_package
step "pip install -e" pip_editable
step check check_environment
touch "$OK_FILE"

T_END=$(date +%s.%N)
echo "setup: OK ($(awk -v a="$T_START" -v b="$T_END" 'BEGIN { printf "%.1f", b - a }') s). Enter the environment with: . $ROOT/env.sh"
if [ "${MATCHANYTHING_SETUP_TIMINGS:-0}" = 1 ]; then printf '%s\n' "${TIMINGS[@]}"; fi
