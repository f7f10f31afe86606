#!/usr/bin/env bash
# Builds the GPU machine's fused_a2a_core on this CPU machine (nvcc here, no GPU needed): CPython
# 3.12, sm_90a, jax 0.11.2's XLA FFI headers, libstdc++ linked statically (as on the GPU image), in
# Release, into .prebuilt/ (git-ignored) with the tree's source hash (tools/source_hash.sh).
# tools/gpu_check.sh's build step then installs it instead of compiling (~100-120 s of device
# time a fresh machine); the device call must carry it: `carry: [".prebuilt"]`. A module whose
# hash no longer matches the tree is ignored there (the build compiles). ~6 min on 2 cores.
#   bash tools/prebuild.sh          (PY312=python3.12 path, PREBUILD_VENV, PREBUILD_DIR)
set -euo pipefail
cd "$(dirname "$0")/.."
PY312=${PY312:-/root/.pyenv/versions/3.12.1/bin/python3}
VENV=${PREBUILD_VENV:-/tmp/fa2a_py312}
BUILD=${PREBUILD_DIR:-/tmp/fa2a_prebuild}
if [[ ! -x $VENV/bin/python ]]; then
  "$PY312" -m venv "$VENV"
  # the GPU machine's versions (/work/.library/device/KINDS.md): the FFI headers of its jax
  "$VENV/bin/pip" install -q pybind11 "jax==0.11.2" "jaxlib==0.11.2"
fi
export PATH=/usr/local/cuda/bin:$PATH
# the hash of the tree as it is now: an edit during the build must not pass as built
source_hash=$(bash tools/source_hash.sh)
cmake -S . -B "$BUILD" -G Ninja -DCMAKE_BUILD_TYPE=Release -DFA2A_PREBUILT_CORE= \
  -DPython_EXECUTABLE="$VENV/bin/python" \
  -Dpybind11_DIR="$("$VENV/bin/python" -c 'import pybind11; print(pybind11.get_cmake_dir())')" \
  -DFA2A_CUDA=ON -DFA2A_CUDA_ARCH="${FUSED_A2A_CUDA_ARCH:-90a}" -DCMAKE_CUDA_FLAGS= >/dev/null
cmake --build "$BUILD" -j"$(nproc)"
mkdir -p .prebuilt
rm -f .prebuilt/*.so .prebuilt/SOURCE_HASH
cp "$BUILD"/fused_a2a_core.cpython-312-*.so .prebuilt/
if [[ $(bash tools/source_hash.sh) != "$source_hash" ]]; then
  echo "prebuild: the sources changed during the build; run it again" >&2
  exit 1
fi
echo "$source_hash" >.prebuilt/SOURCE_HASH
"$VENV/bin/python" -S -c "import sys; sys.path.insert(0, '.prebuilt'); import fused_a2a_core as c; print('prebuilt:', c.__file__, c.build_info())"
ls -la .prebuilt
