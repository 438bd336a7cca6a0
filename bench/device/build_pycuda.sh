#!/usr/bin/env bash
# Build and install pycuda on the GPU machine from the vendored sdist (nothing can be downloaded there).
#
# .device/wheels/ (git-ignored, carried to the device) holds, fetched on the dev machine with
#   pip download --no-binary :all: --no-deps --no-build-isolation pycuda==2026.1
#   pip download --no-deps --only-binary :all: --python-version 3.12 --platform manylinux2014_x86_64 \
#       --platform any pytools platformdirs mako markupsafe typing_extensions siphash24 setuptools wheel
# pycuda compiles its C++ wrapper against the CUDA toolkit found through nvcc (~2.5 min).
# Usage (repo root): bash bench/device/build_pycuda.sh      (PYTHON=python3 by default)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
WHEELS="$ROOT/.device/wheels"
PY="${PYTHON:-python3}"

if "$PY" -c "import pycuda.driver" 2>/dev/null; then
    echo "pycuda already importable: $("$PY" -c 'import pycuda; print(pycuda.VERSION_TEXT)')"
    exit 0
fi
SDIST=$(ls "$WHEELS"/pycuda-*.tar.gz 2>/dev/null | head -1 || true)
if [[ -z "$SDIST" ]]; then
    echo "no pycuda sdist in $WHEELS (see the header of this script)" >&2
    exit 2
fi
if [[ -z "${CUDA_ROOT:-}" ]]; then
    NVCC=$(command -v nvcc || true)
    if [[ -z "$NVCC" && -x /usr/local/cuda/bin/nvcc ]]; then NVCC=/usr/local/cuda/bin/nvcc; fi
    if [[ -z "$NVCC" ]]; then echo "nvcc not found; set CUDA_ROOT" >&2; exit 2; fi
    CUDA_ROOT="$(dirname "$(dirname "$(readlink -f "$NVCC")")")"
fi
export CUDA_ROOT PATH="$CUDA_ROOT/bin:$PATH"
echo "python: $("$PY" --version)  CUDA_ROOT: $CUDA_ROOT  sdist: $(basename "$SDIST")"

# pure-Python dependencies (and the two small compiled ones as cp312 wheels), offline
"$PY" -m pip install --no-index --find-links "$WHEELS" pytools platformdirs mako markupsafe typing_extensions \
    siphash24
# the build itself uses the machine's setuptools/wheel/numpy (no isolated build env: it would need the index)
"$PY" -m pip install --no-index --find-links "$WHEELS" setuptools wheel 2>/dev/null || true
t0=$SECONDS
"$PY" -m pip install --no-index --no-build-isolation --no-deps "$SDIST"
echo "pycuda built and installed in $(( SECONDS - t0 )) s"
"$PY" -c "import pycuda.driver as cuda; cuda.init(); print('pycuda', __import__('pycuda').VERSION_TEXT, \
'driver', cuda.get_driver_version(), 'devices', cuda.Device.count())"
