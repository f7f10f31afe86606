#!/usr/bin/env bash
# compute-sanitizer (memcheck, racecheck, synccheck) over every op of both modes on one GPU
# (tools/sanitize_ops.py; one rank: the sanitizer serialises kernels, and multi-rank kernels wait
# for their peers). Needs a built package (tools/gpu_check.sh STEPS=build). Logs under $OUT.
set -uo pipefail
cd "$(dirname "$0")/.."
source tools/gpu_env.sh
export FUSED_A2A_TIMEOUT_S=${FUSED_A2A_TIMEOUT_S:-120}
for tool in ${TOOLS:-memcheck racecheck synccheck}; do
  timeout "${STEP_TIMEOUT_SANITIZE:-240}" compute-sanitizer --tool "$tool" --error-exitcode 9 \
    --target-processes all python3 tools/sanitize_ops.py >"$OUT/sanitize_$tool.log" 2>&1
  rc=$?
  echo "compute-sanitizer $tool: rc=$rc $(grep -E 'ERROR SUMMARY|^ok' "$OUT/sanitize_$tool.log" | tr '\n' ' ')" \
    | tee -a "$OUT/summary.txt"
done
