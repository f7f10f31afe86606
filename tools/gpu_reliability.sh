#!/usr/bin/env bash
# Issue 8's GPU part in one device call (2 or more GPUs):
#   OUT=... bash tools/gpu_reliability.sh
# 1. build (tools/gpu_check.sh STEPS=build);
# 2. the long stress run (FA2A_GPU_STRESS_ITERS, default 100,000 iterations of random sizes:
#    exact throughout, GPU memory / buffer bytes / host RSS flat), in the background;
# 3. meanwhile fault injection (tests/test_gpu_faults.py: a rank killed mid-dispatch, mid-combine,
#    between, mid-HybridEP-dispatch) and compute-sanitizer memcheck / racecheck / synccheck over
#    every op (tools/gpu_sanitize.sh, one rank on GPU 0).
# Files under $OUT: env.txt build.log summary.txt stress.log faults.log sanitize_*.log.
set -uo pipefail
cd "$(dirname "$0")/.."
source tools/gpu_env.sh
STEPS=build bash tools/gpu_check.sh || exit 1
stress_s=${STEP_TIMEOUT_STRESS:-500}
(
  t0=$(date +%s)
  FA2A_GPU_STRESS_ITERS=${FA2A_GPU_STRESS_ITERS:-100000} FA2A_GPU_STRESS_TIMEOUT_S=$stress_s \
    timeout $((stress_s + 20)) python3 -m pytest -m gpu -q -s -rA tests/test_gpu_normal.py \
    -k stress >"$OUT/stress.log" 2>&1
  echo "stress: rc=$? in $(( $(date +%s) - t0 )) s: $(grep -E 'GPU memory|passed|failed' "$OUT/stress.log" | tr '\n' ' ')" \
    | tee -a "$OUT/summary.txt"
) &
t0=$(date +%s)
timeout "${STEP_TIMEOUT_FAULTS:-300}" python3 -m pytest -m gpu -q -s -rA tests/test_gpu_faults.py \
  >"$OUT/faults.log" 2>&1
echo "faults: rc=$? in $(( $(date +%s) - t0 )) s: $(tail -1 "$OUT/faults.log")" | tee -a "$OUT/summary.txt"
grep -E "survivor .* raised" "$OUT/faults.log" | cut -c1-300 | tee -a "$OUT/summary.txt"
bash tools/gpu_sanitize.sh
wait
