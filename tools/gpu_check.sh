#!/usr/bin/env bash
# One call on the GPU machine: build, link-ceiling probe, GPU tests, benchmark; results under $OUT.
#
#   OUT=/tmp/out bash tools/gpu_check.sh            # everything
#   STEPS=build,probe,bench BENCH_CASES=standard bash tools/gpu_check.sh
#
# Steps (STEPS, comma-separated; default all): build, probe, test, bench.
# FA2A_COMMIT: the commit to record (the device copy has no .git).
# Knobs: PYTEST_ARGS (default: -m gpu tests/test_gpu_normal.py tests/test_gpu_static_rows.py tests/test_gpu_hybrid.py), PYTEST_K (a -k expression),
# BENCH_CASES (EP = all GPUs), BENCH_CASES_EP2 (EP 2 on GPUs 0,1; empty: skipped), STEP_TIMEOUT_* (seconds per step).
# Files written (at most 8, the device tool's limit): env.txt build.log probe.jsonl tests.log
# bench.json bench_ep2.json summary.txt
set -uo pipefail

# NVLink multicast stays off (it can take the host's GPUs out of service).
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PYTHONUNBUFFERED=1
export XLA_PYTHON_CLIENT_PREALLOCATE=false
OUT=${OUT:-$(mktemp -d)}
STEPS=${STEPS:-build,probe,test,bench}
PY=${PYTHON:-python3}
NPROC=$(nproc)
NGPU=$($PY -c 'import torch; print(torch.cuda.device_count())' 2>/dev/null || echo 0)
cd "$(dirname "$0")/.."
ROOT=$(pwd)
export FA2A_COMMIT=${FA2A_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}
has() { [[ ",$STEPS," == *",$1,"* ]]; }
summary() { echo "$*" | tee -a "$OUT/summary.txt"; }

{
  date -u
  echo "commit $FA2A_COMMIT (working tree may differ: see git status below)"
  git status --short 2>/dev/null | head -50
  nvidia-smi -L
  nvidia-smi topo -m 2>/dev/null
  nvcc --version | tail -2
  $PY -c 'import sys, torch, jax; print(sys.version); print("torch", torch.__version__, torch.version.cuda); print("jax", jax.__version__)' 2>&1
} >"$OUT/env.txt" 2>&1
summary "gpu_check: $(date -u +%FT%TZ) commit $FA2A_COMMIT, $NGPU GPU(s): $(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)"

if has build; then
  t0=$(date +%s)
  {
    echo "CXX=$(command -v g++) $(g++ --version | head -1)"
    ls -la /usr/bin/g++* 2>/dev/null
    echo "libstdc++ used by g++: $(g++ -print-file-name=libstdc++.so)"
    head -c 300 "$(g++ -print-file-name=libstdc++.so)" 2>/dev/null | strings | head -5
  } >"$OUT/build.log" 2>&1
  # The image's g++ (/opt/gcc) links part of libstdc++ statically next to the system's shared
  # one; ostream formatting of numbers then crashed inside our module. Link all of libstdc++
  # statically with its symbols hidden (FA2A_STATIC_LIBSTDCXX=0 turns this off).
  # A module prebuilt on the CPU machine for exactly this tree (tools/prebuild.sh, carried as
  # .prebuilt/) is installed instead of compiling, unless the caller sets CMAKE_ARGS (the traced
  # build) or FA2A_PREBUILT=0; FA2A_PREBUILT_CORE is always passed (empty: compile), since the
  # CMake cache keeps it between calls.
  prebuilt=""
  tag=$($PY -c 'import sys; print(f"{sys.version_info[0]}{sys.version_info[1]}")')
  candidate=$(ls "$ROOT"/.prebuilt/fused_a2a_core.cpython-"$tag"-*.so 2>/dev/null | head -1)
  if [[ -n "$candidate" && -z "${CMAKE_ARGS:-}" && "${FA2A_PREBUILT:-1}" == 1 ]]; then
    if [[ "$(cat "$ROOT/.prebuilt/SOURCE_HASH" 2>/dev/null)" == "$(bash tools/source_hash.sh)" ]]; then
      prebuilt=$candidate
    else
      echo "prebuilt module ignored: its source hash is not this tree's" | tee -a "$OUT/build.log"
    fi
  fi
  # CMAKE_CUDA_FLAGS always set: build/ stays on the device between calls and its CMake cache
  # kept the diagnostic build's flags (tools/gpu_diag_trace.sh) for a later plain build, which
  # then rebuilt nothing (session 10: the benches after a trace ran the traced kernels).
  if [[ "${CMAKE_ARGS:-}" != *CMAKE_CUDA_FLAGS* ]]; then
    export CMAKE_ARGS="${CMAKE_ARGS:-} -DCMAKE_CUDA_FLAGS="
  fi
  if [[ "${FA2A_STATIC_LIBSTDCXX:-1}" == 1 ]]; then
    export CMAKE_ARGS="${CMAKE_ARGS:-} -DCMAKE_MODULE_LINKER_FLAGS=-static-libstdc++\ -static-libgcc\ -Wl,--exclude-libs,ALL"
  fi
  install_package() {  # $1: the prebuilt module, or empty to compile
    CMAKE_ARGS="$CMAKE_ARGS -DFA2A_PREBUILT_CORE=$1" CMAKE_BUILD_PARALLEL_LEVEL=$NPROC \
      timeout "${STEP_TIMEOUT_BUILD:-420}" \
      $PY -m pip install --no-build-isolation --no-deps -v -e . >>"$OUT/build.log" 2>&1
  }
  install_package "$prebuilt"
  rc=$?
  if [[ -n "$prebuilt" ]] && ! { [[ $rc -eq 0 ]] && $PY -c 'import fused_a2a_core as c; assert c.build_info()["cuda"]' >>"$OUT/build.log" 2>&1; }; then
    echo "prebuilt module failed (rc=$rc or no CUDA import): compiling" | tee -a "$OUT/build.log"
    prebuilt=""
    install_package ""
    rc=$?
  fi
  summary "build: rc=$rc in $(( $(date +%s) - t0 )) s (${prebuilt:+prebuilt $(basename "$prebuilt"), }CMAKE_ARGS=${CMAKE_ARGS:-})"
  [[ $rc -ne 0 ]] && { tail -40 "$OUT/build.log"; exit 1; }
  so=$($PY -c 'import fused_a2a_core as c; print(c.__file__)')
  { readelf -d "$so" | grep NEEDED; echo "defined std:: symbols: $(nm -D --defined-only "$so" | grep -c _ZNS)"; } >>"$OUT/build.log" 2>&1
  # An error message with a number goes through std::ostringstream: must raise, not crash.
  $PY -c 'import torch, fused_a2a_core as c
try:
    c.recommended_buffer_bytes(-1, 2, 1)
except Exception as e:
    print("error path ok:", type(e).__name__, e)
print(c.build_info(), c.cuda_device_count())' 2>&1 | tee -a "$OUT/summary.txt"
fi

if has probe; then
  t0=$(date +%s)
  if nvcc -std=c++17 -O3 -gencode=arch=compute_90a,code=sm_90a -I csrc/include -I csrc/kernels/cuda \
      benchmarks/link_probe.cu -o /tmp/link_probe >>"$OUT/build.log" 2>&1; then
    timeout "${STEP_TIMEOUT_PROBE:-120}" /tmp/link_probe "${PROBE_BYTES:-268435456}" >"$OUT/probe.jsonl" 2>&1
    summary "probe: rc=$? in $(( $(date +%s) - t0 )) s"
    $PY - "$OUT/probe.jsonl" <<'EOF' | tee -a "$OUT/summary.txt"
import json, sys
for line in open(sys.argv[1]):
    if line.startswith("{"):
        d = json.loads(line)
        if "slowest_GBps" in d:
            mode = d["mode"] + ("/g" if d.get("gather") else "")
            print(f"  ceiling probe: {mode:8s} {d.get('start', 'events'):7s} "
                  f"sms={d['sms']:3d} warps={d['warps']}+{d.get('simt_warps', 0)} "
                  f"stages={d['stages']:2d}: slowest GPU "
                  f"{d['slowest_GBps']:.1f} GB/s egress {d.get('error', '')}")
EOF
  else
    summary "probe: build failed (see build.log)"
  fi
fi

if has test; then
  t0=$(date +%s)
  # shellcheck disable=SC2086
  FUSED_A2A_TIMEOUT_S=${TEST_TIMEOUT_S:-30} timeout "${STEP_TIMEOUT_TEST:-420}" \
    $PY -m pytest ${PYTEST_ARGS:--m gpu tests/test_gpu_normal.py tests/test_gpu_static_rows.py tests/test_gpu_hybrid.py} ${PYTEST_K:+-k "$PYTEST_K"} \
    -q -rfE -s -p no:cacheprovider \
    >"$OUT/tests.log" 2>&1
  summary "tests: rc=$? in $(( $(date +%s) - t0 )) s: $(grep -E '(passed|failed|error)' "$OUT/tests.log" | tail -1)"
  grep -E "^(FAILED|ERROR)|GPU memory before" "$OUT/tests.log" | head -30 | tee -a "$OUT/summary.txt"
fi

if has bench; then
  t0=$(date +%s)
  timeout "${STEP_TIMEOUT_BENCH:-400}" $PY benchmarks/bench_normal.py --world "$NGPU" \
    --cases "${BENCH_CASES:-standard,standard_sms12,decode}" --out "$OUT/bench.json" 2>&1 | tail -60
  summary "bench EP$NGPU: rc=$? in $(( $(date +%s) - t0 )) s"
  if [[ -n "${BENCH_CASES_EP2:-}" && $NGPU -ge 2 ]]; then
    CUDA_VISIBLE_DEVICES=0,1 timeout "${STEP_TIMEOUT_BENCH2:-200}" $PY benchmarks/bench_normal.py \
      --world 2 --cases "$BENCH_CASES_EP2" --out "$OUT/bench_ep2.json" 2>&1 | tail -20
    summary "bench EP2: rc=$?"
  fi
  for f in "$OUT/bench.json" "$OUT/bench_ep2.json"; do
    [[ -f $f ]] || continue
    $PY - "$f" <<'EOF' | tee -a "$OUT/summary.txt"
import json, sys
doc = json.load(open(sys.argv[1]))
print(f"  {doc['meta']['device']} x{doc['meta']['world']} ({doc['meta']['date']})")
for r in doc["results"]:
    if "errors" in r:
        print(f"  {r['case']}: ERROR {r['errors']}")
        continue
    def f(k):
        return (f"{r[k + '_us']:8.1f} us {r[k + '_deepep_GBps']:6.1f} GB/s (wire {r[k + '_wire_GBps']:6.1f})"
                if k + "_us" in r else "-")
    print(f"  {r['case']:28s} sms={r['sms']:3d} exact={r['exact_all_ranks']}")
    for k in ("static_dispatch", "cached_dispatch", "dynamic_dispatch", "combine",
              "combine_weights", "nccl_a2a",
              "static_dispatch_graph", "cached_dispatch_graph", "combine_graph"):
        if k + "_us" in r:
            print(f"      {k:24s} {f(k)}")
EOF
  done
fi
echo "results in $OUT: $(ls "$OUT" | tr '\n' ' ')"
