#!/usr/bin/env bash
# The next GPU session's first call (plan in benchmarks/NOTES.md, "Next GPU session"), 2 or 4 GPUs:
#   OUT=... bash tools/gpu_next.sh
# 1. build; GPU tests: tests/test_gpu_normal.py (the torch suite in every dispatch variant, incl.
#    the opt-in L2 prefetch), test_gpu_faults.py, test_gpu_concurrency.py;
# 2. bench_normal A/B: the L2 prefetch variants (FUSED_A2A_CUDA_PREFETCH 1, 2, 3, 7) and enum for
#    decode, against the default, with per-kernel times;
# 3. fused-a2a bench --mode hybrid (torch): HybridEP incl. the FP8 dispatch row -> hybrid.log;
# 4. tools/gpu_diag_trace.sh: the diagnostic build's traces incl. each role's untraced loop time
#    and the no-roles floor (FUSED_A2A_CUDA_ABLATE=8).
# (Session 3's plan of the same name ran in session 4 as run 9: results/2026-11-26_h100x2_s4.)
set -uo pipefail
cd "$(dirname "$0")/.."
source tools/gpu_env.sh
STEPS=build,test STEP_TIMEOUT_TEST=${STEP_TIMEOUT_TEST:-300} TEST_TIMEOUT_S=10 \
  PYTEST_ARGS="-m gpu tests/test_gpu_normal.py tests/test_gpu_faults.py tests/test_gpu_concurrency.py" \
  PYTEST_K="${PYTEST_K:-not jax_gpu_suite}" bash tools/gpu_check.sh || exit 1
FA2A_BENCH_KERNELS=1 STEPS=bench \
  BENCH_CASES=${BENCH_CASES:-standard,standard_pf1,standard_pf2,standard_pf3,standard_pf7,decode,decode_pf7,decode_enum} \
  bash tools/gpu_check.sh | tail -70
mv "$OUT/bench.json" "$OUT/bench_ab.json"
# HybridEP incl. the FP8 dispatch row (torch), before the diagnostic build replaces the package.
NGPU=$(python3 -c 'import torch; print(torch.cuda.device_count())')
timeout "${STEP_TIMEOUT_HYBRID:-150}" fused-a2a bench --ranks "$NGPU" --tokens 4096 --mode hybrid \
  --frontend torch --iters 10 --out /tmp/hybrid >"$OUT/hybrid.log" 2>&1
echo "hybrid bench: rc=$?" | tee -a "$OUT/summary.txt"
grep -E "hybrid|normal\+" "$OUT/hybrid.log" | tail -8 | tee -a "$OUT/summary.txt"
bash tools/gpu_diag_trace.sh
