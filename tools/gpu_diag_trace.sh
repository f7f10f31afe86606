#!/usr/bin/env bash
# Traced A/B of the dispatch in the diagnostic build (-DFA2A_CUDA_TRACE=1 -DFA2A_CUDA_ABLATE=1),
# one device call on 2+ GPUs: decode and standard, and with no sender/receiver roles at all
# (FUSED_A2A_CUDA_ABLATE=8: launch + handshakes + epilogue), and the combine's trace after it
# (session 25: its senders and reducers, slots in csrc/kernels/cuda/state.h); TRACE_CASES picks
# other cases of benchmarks/bench_normal.py (e.g. run 12's ablations). Prints rank 0's per-warp
# phase summary, incl. each role's untraced loop time (benchmarks/NOTES.md, sessions 4-5).
#   OUT=... bash tools/gpu_diag_trace.sh
set -uo pipefail
cd "$(dirname "$0")/.."
source tools/gpu_env.sh
export FUSED_A2A_TIMEOUT_S=10
CMAKE_ARGS="-DCMAKE_CUDA_FLAGS=-DFA2A_CUDA_TRACE=1\ -DFA2A_CUDA_ABLATE=1" STEPS=build bash tools/gpu_check.sh >/dev/null
FUSED_A2A_CUDA_TRACE=1 STEPS=bench BENCH_CASES=${TRACE_CASES:-decode,decode_abl_roles,standard,standard_abl_roles} \
  timeout 150 bash tools/gpu_check.sh >/dev/null
python3 - "$OUT/bench.json" <<'PY' | tee -a "$OUT/summary.txt"
import json, sys
for r in json.load(open(sys.argv[1]))["results"]:
    us = {k: r.get(k + "_us") for k in ("static_dispatch", "static_dispatch_graph", "cached_dispatch",
                                        "combine", "combine_weights")}
    print(f"  trace {r['case']}: {us}")
    # the dispatch's trace, then the combine's (session 25), rank 0's and every rank's finish
    for key, op in (("trace_per_rank", "dispatch"), ("trace_combine_per_rank", "combine"),
                    ("trace_combine_weights_per_rank", "combine_weights")):
        ranks = r.get(key, [{}])
        t = ranks[0]
        print(f"    {op} rank 0:")
        for role in ("sender", "receiver"):
            print(f"      {role}: " + ", ".join(
                f"{k} {[round(x) for x in v] if isinstance(v, list) else round(v)}"
                for k, v in t.get(role, {}).items()))
        starts = [round(x.get("sender", {}).get("start_ns", [0, 0])[1]) for x in ranks]
        ends = [round(x.get("receiver", {}).get("finish_ns", [0, 0])[1]) for x in ranks]
        print(f"    {op} every rank: senders start (max) {starts}, receivers finish (max) {ends}")
PY
