#!/usr/bin/env bash
# The hash of what fused_a2a_core is built from (csrc/, CMakeLists.txt) and for (the CUDA arch),
# the same on the CPU machine and the GPU machine's copy of the tree (which has no usable git):
# tools/prebuild.sh writes it beside its module, tools/gpu_check.sh installs that module only
# when the hashes match.
set -euo pipefail
cd "$(dirname "$0")/.."
{
  find csrc CMakeLists.txt -type f -not -name '*.pyc' -print0 | LC_ALL=C sort -z | xargs -0 sha256sum
  echo "arch ${FUSED_A2A_CUDA_ARCH:-90a}"
} | sha256sum | cut -d' ' -f1
