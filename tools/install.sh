#!/usr/bin/env bash
# Installs what fused_a2a needs on a fresh CPU machine (Python 3.10+, pip), then builds the
# package in place. CUDA kernels are compiled when nvcc is on PATH (FUSED_A2A_CUDA=0 skips them).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
# torch 2.13.0 comes from the local CPU wheel on these machines; jax resolves to the CPU build.
$PY -m pip install -q --disable-pip-version-check \
  "torch==2.13.0" "jax>=0.10.2" numpy ml_dtypes \
  pytest pytest-timeout hypothesis matplotlib \
  "scikit-build-core>=0.10" "pybind11>=2.12" cmake ninja
# --no-build-isolation: the build reads the XLA FFI headers from the installed jaxlib.
CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)} \
  $PY -m pip install -q --disable-pip-version-check --no-build-isolation --no-deps -e .
$PY -c "import fused_a2a; print('fused_a2a built:', fused_a2a.build_info())"
