#!/usr/bin/env bash
# Build and install Horovod (the second distributed-training backend) into the project's venv.
#
# Idempotent and cached:
#   1. nothing to do when `import horovod.torch` already works in the venv;
#   2. else install the wheel from the cache (seconds) when one exists for this
#      horovod + torch (+ its CUDA) + python + platform combination;
#   3. else build the wheel from source (~6.5 min on 2 cores), put it in the cache, install it.
#
# Run after scripts/env.sh (which creates the venv with torch and pyspark):
#   bash scripts/env.sh && bash scripts/install_horovod.sh
#
# Environment:
#   COURIER_VENV               venv to install into (default: <repo>/.venv)
#   COURIER_WHEEL_CACHE        wheel cache (default: $HOME/.cache/courier/wheels)
#   COURIER_HOROVOD_VERSION    default 0.28.1 (the version measured in docs/DESIGN "Storage and engines")
#   COURIER_BUILD_JOBS         parallel compile jobs (default: nproc)
#   COURIER_HOROVOD_FORCE=1    rebuild even when a cached wheel exists (the old one is replaced)
#   HOROVOD_BUILD_CUDA_CC_LIST e.g. "80,90": only these GPU archs for Horovod's CUDA kernels (default:
#                              every arch nvcc supports; the kernels are unused by CPU/gloo training)
#   CUDA_HOME                  CUDA toolkit root when nvcc is found (default: /usr/local/cuda)
#
# Why these settings (measured 2026-11-23, torch 2.14.1, Python 3.11, cmake 3.25, g++ 12, CUDA 13.0):
#   * Horovod 0.28.1 is source-only on PyPI. Its CMake forces -std=c++14 but torch 2.14's headers need
#     C++20, so CXX is a wrapper that appends -std=c++20 (the last -std wins).
#   * PyPI's torch is a CUDA build. Horovod's FindPytorch asks torch for CUDA_HOME, which torch finds
#     whenever nvcc is on PATH or /usr/local/cuda exists, and then builds the CUDA variant no matter
#     what (there is no CPU-only switch for a CUDA torch); so when nvcc exists the CUDA path is taken on
#     purpose with CUDAToolkit_ROOT=CUDA_HOME=<toolkit root> (here /usr/local/bin/nvcc is a wrapper
#     script, torch would otherwise guess CUDA_HOME=/usr/local and CMake would not find the toolkit).
#     The resulting library links the CUDA runtime statically and runs on machines without a GPU.
#     Without nvcc (and without a toolkit) the CPU path is taken.
#   * HOROVOD_WITH_PYTORCH=1 HOROVOD_WITH_GLOO=1 HOROVOD_WITHOUT_MPI=1 HOROVOD_WITHOUT_TENSORFLOW=1
#     HOROVOD_WITHOUT_MXNET=1; `pip wheel --no-build-isolation` so the build sees the venv's torch.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${COURIER_VENV:-$ROOT/.venv}"
PY="$VENV/bin/python"
HVD_VERSION="${COURIER_HOROVOD_VERSION:-0.28.1}"
CACHE_ROOT="${COURIER_WHEEL_CACHE:-$HOME/.cache/courier/wheels}"
JOBS="${COURIER_BUILD_JOBS:-$(nproc 2>/dev/null || echo 2)}"

say() { echo "[horovod] $*"; }
die() { echo "[horovod] ERROR: $*" >&2; exit 1; }
pipq() {  # pip, quiet; pip's warnings about unreachable local mirrors are noise
  "$PY" -m pip "$@" 2> >(grep -v "is ignored" >&2)
}

[ -x "$PY" ] || die "no Python in $VENV (run scripts/env.sh first, or set COURIER_VENV)"
"$PY" -c "import torch" 2>/dev/null || die "torch is not importable in $VENV (run scripts/env.sh first)"
# One build at a time: two test runs started together would build twice into the same venv and log.
exec 8>"$VENV.horovod.lock"
flock 8

hvd_ok() {
  "$PY" - "$HVD_VERSION" <<'EOF' >/dev/null 2>&1
import sys
import horovod, horovod.torch as hvd  # loads the compiled extension
sys.exit(0 if horovod.__version__ == sys.argv[1] and hvd.gloo_built() else 1)
EOF
}

if [ "${COURIER_HOROVOD_FORCE:-0}" != "1" ] && hvd_ok; then
  say "horovod $HVD_VERSION (PyTorch, Gloo) is already installed in $VENV; nothing to do"
  exit 0
fi

# ---- cache key: horovod + torch (and its CUDA) + python + platform ---------------------------------
KEY="$("$PY" - "$HVD_VERSION" <<'EOF'
import platform, sys, torch
cuda = torch.version.cuda
print(f"horovod-{sys.argv[1]}_torch-{torch.__version__.replace('+', '-')}"
      f"_{'cu' + cuda if cuda else 'cpu'}_cp{sys.version_info[0]}{sys.version_info[1]}_{platform.machine()}")
EOF
)"
CACHE_DIR="$CACHE_ROOT/$KEY"

install_cached() {
  local whl
  whl="$(ls "$CACHE_DIR"/horovod-"$HVD_VERSION"-*.whl 2>/dev/null | head -n1 || true)"
  [ -n "$whl" ] || return 1
  say "installing cached wheel $whl"
  pipq install -q --force-reinstall --no-deps "$whl" \
    || die "pip could not install the cached wheel $whl (delete $CACHE_DIR to rebuild)"
  # runtime requirements of horovod (normally already present: cloudpickle psutil pyyaml packaging)
  pipq install -q cloudpickle psutil pyyaml packaging || die "pip could not install horovod's runtime requirements"
  if ! hvd_ok; then
    "$PY" -c "import horovod.torch" || true
    die "the cached wheel $whl installed but 'import horovod.torch' fails (error above); delete $CACHE_DIR to rebuild"
  fi
  say "horovod $HVD_VERSION (PyTorch, Gloo) ready in $VENV; launcher: $VENV/bin/horovodrun"
}

if [ "${COURIER_HOROVOD_FORCE:-0}" != "1" ] && install_cached; then
  exit 0
fi

# ---- build from source -------------------------------------------------------------------------------
command -v g++ >/dev/null 2>&1 || die "g++ not found: Horovod is a C++ extension (apt-get install -y g++ make)"
command -v make >/dev/null 2>&1 || die "make not found (apt-get install -y make)"

# build-time python requirements (--no-build-isolation: they must be in the venv)
say "checking build requirements in $VENV"
pipq install -q "setuptools>=70" wheel packaging cloudpickle psutil pyyaml \
  || die "pip could not install the build requirements (setuptools wheel packaging cloudpickle psutil pyyaml)"
# cmake >= 3.13: the system's when new enough, else the PyPI 'cmake' package into the venv
cmake_ok() {
  local v
  v="$(cmake --version 2>/dev/null | sed -n 's/^cmake version \([0-9][0-9.]*\).*/\1/p')" || return 1
  [ -n "$v" ] && "$PY" -c "import sys; from packaging.version import Version as V; sys.exit(0 if V('$v') >= V('3.13') else 1)"
}
export PATH="$VENV/bin:$PATH"
if ! cmake_ok; then
  say "no cmake >= 3.13 on PATH; installing the 'cmake' package into $VENV"
  pipq install -q "cmake>=3.13,<4" || die "pip could not install cmake (or install cmake >= 3.13 on the system)"
  cmake_ok || die "cmake >= 3.13 is still not on PATH after installing it into $VENV"
fi

REAL_CXX="$(command -v "${CXX:-g++}")" || die "C++ compiler ${CXX:-g++} not found"
cuda_env=()
if command -v nvcc >/dev/null 2>&1 || [ -n "${CUDA_HOME:-}" ]; then
  cuda_root="${CUDA_HOME:-/usr/local/cuda}"
  [ -x "$cuda_root/bin/nvcc" ] && [ -f "$cuda_root/include/cuda_runtime.h" ] \
    || die "nvcc is on PATH but no CUDA toolkit at $cuda_root (needs bin/nvcc and include/cuda_runtime.h); set CUDA_HOME to the toolkit root"
  say "nvcc found: building the CUDA variant with CUDA_HOME=CUDAToolkit_ROOT=$cuda_root (torch is a CUDA build)"
  cuda_env=(CUDA_HOME="$cuda_root" CUDAToolkit_ROOT="$cuda_root")
else
  say "no nvcc: building the CPU variant"
fi

WORK="$(mktemp -d "${TMPDIR:-/tmp}/courier-horovod-build.XXXXXX")"
ticker=""
cleanup() {
  if [ -n "$ticker" ]; then kill "$ticker" 2>/dev/null || true; fi
  rm -rf "$WORK"
}
trap cleanup EXIT  # also when the build fails or is interrupted
LOG="$CACHE_ROOT/build-$KEY.log"
mkdir -p "$CACHE_ROOT"
: > "$LOG"

# C++20 wrapper: Horovod's CMake sets -std=c++14; the last -std on the command line wins.
cat > "$WORK/cxx20" <<EOF
#!/bin/sh
exec "$REAL_CXX" "\$@" -std=c++20
EOF
chmod +x "$WORK/cxx20"

build_env=(
  CXX="$WORK/cxx20"
  HOROVOD_WITH_PYTORCH=1 HOROVOD_WITH_GLOO=1
  HOROVOD_WITHOUT_MPI=1 HOROVOD_WITHOUT_TENSORFLOW=1 HOROVOD_WITHOUT_MXNET=1
  MAKEFLAGS="-j$JOBS"
  ${cuda_env[@]+"${cuda_env[@]}"}
)

say "building horovod $HVD_VERSION from source (~6.5 min on 2 cores, $JOBS jobs); log: $LOG"
start=$SECONDS
(
  # progress: a line every 30 s while the compiler runs
  set +e +o pipefail  # a progress line must never end the ticker (grep finds nothing at first)
  while sleep 30; do
    step="$(grep -E '^[[:space:]]*\[ *[0-9]+%\]' "$LOG" | tail -n1 | sed 's/^[[:space:]]*//' | cut -c1-110)"
    echo "[horovod]   ... still building ($((SECONDS - start)) s) ${step:-(configuring)}"
  done
) &
ticker=$!
set +e
env "${build_env[@]}" "$PY" -m pip wheel -v --no-deps --no-build-isolation --no-cache-dir \
  "horovod==$HVD_VERSION" -w "$WORK/dist" >>"$LOG" 2>&1
rc=$?
set -e
kill "$ticker" 2>/dev/null || true
wait "$ticker" 2>/dev/null || true
ticker=""
if [ $rc -ne 0 ]; then
  echo "[horovod] ---- last 40 lines of $LOG ----" >&2
  tail -n 40 "$LOG" >&2
  die "building horovod $HVD_VERSION failed (pip exit $rc) after $((SECONDS - start)) s; full log: $LOG (look for 'CMake Error' or 'error:')"
fi
whl="$(ls "$WORK"/dist/horovod-"$HVD_VERSION"-*.whl 2>/dev/null | head -n1 || true)"
[ -n "$whl" ] || die "pip reported success but wrote no horovod wheel into $WORK/dist; log: $LOG"
say "built $(basename "$whl") in $((SECONDS - start)) s"

mkdir -p "$CACHE_DIR"
rm -f "$CACHE_DIR"/horovod-*.whl
cp "$whl" "$CACHE_DIR.tmp.$$" && mv "$CACHE_DIR.tmp.$$" "$CACHE_DIR/$(basename "$whl")"  # atomic on one fs
cp "$LOG" "$CACHE_DIR/build.log"
say "cached in $CACHE_DIR"
install_cached || die "could not install the freshly built wheel from $CACHE_DIR"
