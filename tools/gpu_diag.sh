#!/usr/bin/env bash
# Session 4's diagnosis of the normal-mode dispatch, with the GPU tests, in one device call:
#   OUT=... bash tools/gpu_diag.sh
# 1. build; tests/test_gpu_normal.py (torch suite in every item mode, torch vs JAX, determinism,
#    graphs, timeout, 1,000-iteration stress) and tests/test_gpu_faults.py;
# 2. per-kernel GPU times (FA2A_BENCH_KERNELS=1, torch.profiler) of the standard and decode cases
#    -> bench_kernels.json;
# 3. a diagnostic build (-DFA2A_CUDA_TRACE=1 -DFA2A_CUDA_ABLATE=1): per-warp phase traces of the
#    standard and decode dispatch -> bench_trace.json, and the ablations (receivers copy nothing,
#    senders push no rows, ...) against that build's baseline -> bench.json.
set -uo pipefail
cd "$(dirname "$0")/.."
source tools/gpu_env.sh
STEPS=build,test STEP_TIMEOUT_TEST=${STEP_TIMEOUT_TEST:-280} TEST_TIMEOUT_S=10 \
  PYTEST_ARGS="-m gpu tests/test_gpu_normal.py tests/test_gpu_faults.py" \
  PYTEST_K="${PYTEST_K:-not jax_gpu_suite}" bash tools/gpu_check.sh || exit 1
grep -E "survivor .* raised" "$OUT/tests.log" | cut -c1-240 | tee -a "$OUT/summary.txt"
FA2A_BENCH_KERNELS=1 STEPS=bench BENCH_CASES=${KERNEL_CASES:-standard,decode} \
  bash tools/gpu_check.sh >/dev/null
mv "$OUT/bench.json" "$OUT/bench_kernels.json"
python3 - "$OUT/bench_kernels.json" <<'PY' | tee -a "$OUT/summary.txt"
import json, sys
for r in json.load(open(sys.argv[1]))["results"]:
    for op, rows in r.get("kernels_per_rank", [{}])[0].items():
        print(f"  {r['case']} {op} ({r.get(op + '_us')} us by events), rank 0 kernels:")
        for name, per_call, us in rows[:3]:
            print(f"      {per_call:5.2f} x {us:8.1f} us  {name[:60]}")
PY
export FUSED_A2A_TIMEOUT_S=10
CMAKE_ARGS="-DCMAKE_CUDA_FLAGS=-DFA2A_CUDA_TRACE=1\ -DFA2A_CUDA_ABLATE=1" STEPS=build \
  bash tools/gpu_check.sh >/dev/null
FUSED_A2A_CUDA_TRACE=1 STEPS=bench BENCH_CASES=standard,decode bash tools/gpu_check.sh >/dev/null
mv "$OUT/bench.json" "$OUT/bench_trace.json"
python3 - "$OUT/bench_trace.json" <<'PY' | tee -a "$OUT/summary.txt"
import json, sys
for r in json.load(open(sys.argv[1]))["results"]:
    t = r.get("trace_per_rank", [{}])[0]
    print(f"  trace {r['case']}: static dispatch {r.get('static_dispatch_us')} us; rank 0:")
    for role in ("sender", "receiver"):
        print(f"    {role}: " + ", ".join(f"{k} {v}" for k, v in t.get(role, {}).items()))
PY
STEPS=bench BENCH_CASES=${ABLATE_CASES:-standard,standard_abl_recv,standard_abl_rows,standard_abl_recv_meta,standard_abl_all} \
  bash tools/gpu_check.sh >/dev/null
tail -45 "$OUT/summary.txt"
