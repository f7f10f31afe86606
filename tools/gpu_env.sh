# Sourced by the tools/gpu_*.sh scripts (after `cd` to the repository root): NVLink multicast off
# (it can take a shared host's GPUs out of service: /work/.library/device/KINDS.md), unbuffered
# Python, and $OUT (the device tool's output folder, or a temporary one) exported.
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PYTHONUNBUFFERED=1
OUT=${OUT:-$(mktemp -d)}
export OUT
