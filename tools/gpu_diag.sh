#!/usr/bin/env bash
# Session 4's diagnosis of the normal-mode dispatch, plus issue 8's fault test, in one device call:
#   OUT=... bash tools/gpu_diag.sh
# 1. build + link-ceiling probe (tools/gpu_check.sh STEPS=build,probe);
# 2. tests/test_gpu_faults.py;
# 3. per-kernel GPU times of static/cached dispatch, combine and NCCL (FA2A_BENCH_KERNELS=1,
#    torch.profiler) for the standard and decode cases -> bench_kernels.json;
# 4. a build with -DFA2A_CUDA_ABLATE=1 and the ablation cases (receivers copy nothing, senders
#    stage no metadata, senders push no rows) against the same build's baseline -> bench.json.
set -uo pipefail
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PYTHONUNBUFFERED=1
OUT=${OUT:-$(mktemp -d)}
export OUT
cd "$(dirname "$0")/.."
STEPS=build,probe bash tools/gpu_check.sh || exit 1
t0=$(date +%s)
timeout "${STEP_TIMEOUT_FAULTS:-240}" python3 -m pytest -m gpu -q -s -rA tests/test_gpu_faults.py \
  >"$OUT/faults.log" 2>&1
echo "faults: rc=$? in $(( $(date +%s) - t0 )) s: $(tail -1 "$OUT/faults.log")" | tee -a "$OUT/summary.txt"
grep -E "survivor .* raised" "$OUT/faults.log" | cut -c1-260 | tee -a "$OUT/summary.txt"
FA2A_BENCH_KERNELS=1 STEPS=bench BENCH_CASES=${KERNEL_CASES:-standard,decode} \
  bash tools/gpu_check.sh >/dev/null
mv "$OUT/bench.json" "$OUT/bench_kernels.json"
python3 - "$OUT/bench_kernels.json" <<'PY' | tee -a "$OUT/summary.txt"
import json, sys
for r in json.load(open(sys.argv[1]))["results"]:
    for op, rows in r.get("kernels_per_rank", [{}])[0].items():
        print(f"  {r['case']} {op} ({r.get(op + '_us')} us by events), rank 0 kernels:")
        for name, per_call, us in rows[:6]:
            print(f"      {per_call:5.2f} x {us:8.1f} us  {name}")
PY
CMAKE_ARGS="-DCMAKE_CUDA_FLAGS=-DFA2A_CUDA_ABLATE=1" STEPS=build bash tools/gpu_check.sh >/dev/null
STEPS=bench BENCH_CASES=${ABLATE_CASES:-standard,standard_abl_recv,standard_abl_meta,standard_abl_rows,standard_abl_recv_meta,standard_abl_all} \
  bash tools/gpu_check.sh >/dev/null
tail -60 "$OUT/summary.txt"
