#!/usr/bin/env bash
# The A/B plan left by session 3 (benchmarks/NOTES.md), in one device call on 2 or 4 GPUs:
#   OUT=... bash tools/gpu_next.sh
# 1. build; 2. the normal-mode GPU tests (the torch suite runs both item modes: scan and enum);
# 3. bench_normal: the default scan vs FUSED_A2A_CUDA_ITEMS=enum (+ FUSED_A2A_CUDA_META=prepass)
#    at CR 32 and 8, decode;
# 4. fused-a2a bench HybridEP (torch + JAX) with the default buffer and one sized for a single
#    combine round (FUSED_A2A_HYBRID_FANOUT=8), normal + permute as the baseline.
# Files under $OUT: those of tools/gpu_check.sh plus hybrid_f1.log, hybrid_f8.log.
set -uo pipefail
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PYTHONUNBUFFERED=1 FA2A_GPU_TEST_TIMEOUT_S=${FA2A_GPU_TEST_TIMEOUT_S:-10}
OUT=${OUT:-$(mktemp -d)}
export OUT
cd "$(dirname "$0")/.."
STEPS=build,test STEP_TIMEOUT_TEST=${STEP_TIMEOUT_TEST:-240} \
  PYTEST_ARGS="-m gpu tests/test_gpu_normal.py" PYTEST_K="${PYTEST_K:-not jax_gpu_suite}" \
  bash tools/gpu_check.sh
STEPS=bench BENCH_CASES=${BENCH_CASES:-standard,standard_enum,standard_enum_prepass,standard_cr8,standard_cr8_enum,decode,decode_enum} \
  bash tools/gpu_check.sh
NGPU=$(python3 -c 'import torch; print(torch.cuda.device_count())')
for fanout in 1 8; do
  FUSED_A2A_HYBRID_FANOUT=$fanout timeout "${STEP_TIMEOUT_HYBRID:-150}" fused-a2a bench \
    --ranks "$NGPU" --tokens 4096 --mode hybrid --iters 10 --out "/tmp/hybrid_f$fanout" \
    >"$OUT/hybrid_f$fanout.log" 2>&1
  echo "hybrid bench, FUSED_A2A_HYBRID_FANOUT=$fanout: rc=$?" | tee -a "$OUT/summary.txt"
  grep -E "hybrid|normal\+" "$OUT/hybrid_f$fanout.log" | tail -12 | tee -a "$OUT/summary.txt"
done
