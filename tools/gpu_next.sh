#!/usr/bin/env bash
# The GPU sessions' calls (plan in benchmarks/NOTES.md, "Next steps after session N"), best on
# nvidia-h100-x4 (2 GPUs also work: the 3- and 4-GPU cases skip). One call per part:
#   PART=tests (~5 min) and tests_rows (~6 min): the normal-mode GPU tests (without / only
#       test_static_big_rows); PART=tests2 (~5 min): HybridEP, host counts, faults, concurrency;
#       PART=s21b (~7 min): the torch suite's arena variants, stress, graphs, faults, concurrency
#   PART=verify (~4 min): build; the normal-mode tests of both frontends (own rows by default,
#       senders, split), JAX HybridEP; bench A/B at EP = all GPUs and EP 2 (own rows, 32 SMs)
#   PART=fab (~4 min): the whole fused-a2a bench --ranks all GPUs (issue 4's table)
#   PART=perf (~6 min): link probe, bench A/B, fused-a2a bench, traces with run 12's ablations
#   PART=sweep (~3 min): the N sweep at EP 4 and EP 2 (torch), with plots
#   PART=hyb (~4 min): build; torch HybridEP GPU tests (incl. the pipelined combine); HybridEP
#       bench at N = 4096 with FUSED_A2A_HYBRID_PIPELINE=0 / 1
#   PART=hybk (~3 min): HybridEP kernel times, timeline and bench at the defaults (and HYBK_ENV)
#   PART=jaxk (~3 min): the JAX dispatch loop's kernels and gaps against torch's kernel times
#   PART=prologue (~3 min): the dispatch prologue's steady-state trace and the loop's kernels
#   PART=fp8host (~3 min): the eager FP8 dispatch's kernel and host times
#   PART=s29 (~6 min): branch s29, a graph capture's recv_x in the output arena (direct rows in
#       CUDA graphs): tests, then the bench's graph rows
#   PART=s29b (~6 min): the FP8 dynamic dispatch through the static kernel, the prebuilt
#       module's HybridEP: tests, then the whole bench at 24 SMs
#   PART=s29c (~7 min): the cached dispatch as a static dispatch: tests, then its A/B
#   PART=host (~3 min): host_profile.py at N = 128 / 4096 with the core's host phases a call
#   PART=s30a (~8 min): session 29's GPU-untested commits (graph rows after many cases, host
#       phases) and the FP8 dynamic dispatch's eager spread
# Each writes under $OUT; pass FA2A_COMMIT=<sha> (the device copy has no usable git). Run
# `bash tools/prebuild.sh` here first (~6 min, no GPU) and carry ".prebuilt": the build step then
# installs that module instead of compiling (~100-120 s of device time a fresh machine). The
# one-off parts of earlier sessions (s7 ... s28d: A/Bs whose outcomes are in benchmarks/NOTES.md)
# are in
# git history.
set -uo pipefail
cd "$(dirname "$0")/.."
source tools/gpu_env.sh
export FA2A_COMMIT=${FA2A_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}
NGPU=$(python3 -c 'import torch; print(torch.cuda.device_count())')

# HybridEP kernel times (benchmarks/hybrid_kernels.py, standard case, all GPUs) under the
# environment settings after the first two arguments (label, JSON path): one line with the data
# and combine kernels' mean times.
hyb_kernels() {
  local label=$1 out=$2
  shift 2
  env "$@" timeout 80 python3 benchmarks/hybrid_kernels.py --world "$NGPU" --out "$out" 2>&1 \
    | grep -E "^[a-z]|data_kernel|combine_kernel" | tr '\n' ' ' | sed "s/^/$label  /" | cut -c1-400
  echo
}

# The torch HybridEP bench at N = 4096 (against normal mode + permute and NCCL) under the
# environment settings after the first argument (the output name under $OUT).
hyb_bench() {
  local tag=$1
  shift
  env "$@" timeout 100 fused-a2a bench --ranks "$NGPU" --tokens 4096 --mode hybrid \
    --frontend torch --out "$OUT/$tag" >"$OUT/$tag.log" 2>&1
  echo "hybrid bench (torch) $tag $*: rc=$?"
  grep -E "^torch" "$OUT/$tag.log" | cut -c1-90
  rm -f "$OUT/$tag"/*.png
}
# Rank 0's top kernels per case and op of the last bench_normal run with FA2A_BENCH_KERNELS=1
# ($OUT/bench.json): name, calls, time.
bench_kernel_times() {
  python3 - "$OUT/bench.json" <<'PY'
import json, sys
for r in json.load(open(sys.argv[1]))["results"]:
    for op, rows in r.get("kernels_per_rank", [{}])[0].items():
        print(f"  kernels {r['case']} {op}: " + "; ".join(f"{n[:40]} x{c} {t}" for n, c, t in rows[:4]))
PY
}

# Build, then the GPU tests of the files in $1 selected by -k $2 (empty: all; timeout $3 s, 420);
# prints the build and test summaries, failures, and the tests.log tail matching $4's pattern
# (default: counts, failures, slowest calls).
gpu_tests() {
  STEPS=build,test STEP_TIMEOUT_TEST=${3:-420} TEST_TIMEOUT_S=20 \
    PYTEST_ARGS="-m gpu --durations=8 $1" PYTEST_K="$2" \
    bash tools/gpu_check.sh | grep -E "build:|tests:|FAILED"
  grep -E "${4:-passed|failed|FAILED|s call}" "$OUT/tests.log" | tail -16 | cut -c1-300
  rm -f "$OUT/build.log"
}

# The JAX normal-mode bench at N = 4096 on all GPUs under the environment settings after the
# first argument (the output name under $OUT), without the peers.
jax_bench() {
  local tag=$1
  shift
  env "$@" timeout 100 fused-a2a bench --ranks "$NGPU" --tokens 4096 --mode normal \
    --frontend jax --no-peers --out "$OUT/$tag" >"$OUT/$tag.log" 2>&1
  echo "JAX bench $tag $*: rc=$?"
  grep -E "^jax" "$OUT/$tag.log" | cut -c1-100
}
# host_profile.py at N = 128 and 4096 without cProfile: each op's host and wall time a call and,
# on GPUs, the core's host phases a call (fused_a2a_core.cuda_host_phases).
host_phases() {
  local n
  for n in 128 4096; do
    timeout 150 python3 benchmarks/host_profile.py --world "$NGPU" --tokens "$n" --calls 100 \
      --repeat 2 --profiles 0 --out "$OUT/host_n$n.json" >"$OUT/host_n$n.log" 2>&1
    echo "host_profile N=$n: rc=$?"
    grep -E "^op |^raw |^fused|^get_buffer|^torch|^    core" "$OUT/host_n$n.log" | cut -c1-150
  done
}
case "${PART:-tests}" in
  tests | tests_rows)  # the normal-mode GPU tests in two calls at G = 4 (one took more than
    # 420 s in run 72): tests = all but test_static_big_rows, tests_rows = it (20 cases; since
    # session 15 in two spawns, one per buffer size, instead of one spawn per case of ~14 s; the 18
    # test_static_fp8_rows cases likewise)
    if [[ $PART == tests ]]; then k="not big_rows"; else k="big_rows"; fi
    gpu_tests "tests/test_gpu_normal.py tests/test_gpu_static_rows.py" "$k" "${STEP_TIMEOUT_TEST:-480}"
    ;;
  tests2)  # the other GPU tests: HybridEP, host counts, faults, concurrency
    gpu_tests "tests/test_gpu_hybrid.py tests/test_gpu_host_counts.py tests/test_gpu_faults.py tests/test_gpu_concurrency.py" \
      "" "${STEP_TIMEOUT_TEST:-480}"
    ;;
  perf)
    STEPS=build,probe bash tools/gpu_check.sh | tail -14
    # Chunk rows 8 / 16 against 32: run 3 chose 32 while every warp still walked every item
    # (more items, more walking); a 32-row chunk is one warp's 458 KB copy at the receiver.
    STEPS=bench BENCH_CASES=${BENCH_CASES:-standard,standard_selfrecv,standard_cr16,standard_cr8,decode,decode_selfsend,n1024_selfrecv,n1024_selfsend} \
      BENCH_CASES_EP2=${BENCH_CASES_EP2:-standard,decode} timeout 240 bash tools/gpu_check.sh | tail -70
    mv "$OUT/bench.json" "$OUT/bench_ab.json"
    timeout "${STEP_TIMEOUT_FAB:-200}" fused-a2a bench --ranks "$NGPU" --out "$OUT/fab" >"$OUT/fab.log" 2>&1
    echo "fused-a2a bench --ranks $NGPU: rc=$?" | tee -a "$OUT/summary.txt"
    grep -vE '^\[' "$OUT/fab.log" | tail -30
    TRACE_CASES=${TRACE_CASES:-standard,decode,standard_abl_recv,standard_abl_rows,standard_abl_roles} \
      bash tools/gpu_diag_trace.sh
    ;;
  verify)  # tests of both frontends and modes, then the bench A/B (session 6: run 24)
    gpu_tests "tests/test_gpu_normal.py tests/test_gpu_static_rows.py tests/test_gpu_hybrid.py" \
      "${VERIFY_K:-jax_gpu_hybrid_suite or torch_gpu_matches or jax_gpu_suite or bitwise or same_bits}" \
      "${STEP_TIMEOUT_TEST:-300}"
    # Who copies the own rows, again, now that chunks are 8 rows (NOTES, "Next steps after
    # session 6", step 1): the senders' pipes carry the own rows too (1/4 of all rows at EP 4,
    # 1/2 at EP 2); receivers, or half each (split); and 32 SMs (more bytes in flight).
    STEPS=bench BENCH_CASES=${BENCH_CASES:-standard,standard_selfrecv,standard_selfsplit,standard_sms32,decode} \
      BENCH_CASES_EP2=${BENCH_CASES_EP2:-standard,standard_selfrecv,standard_selfsplit,decode} \
      timeout 200 bash tools/gpu_check.sh | tail -64
    ;;
  fab)  # (the build first: on a warm machine's build it is a no-op of seconds)
    STEPS=build bash tools/gpu_check.sh | grep -E "build:"
    timeout "${STEP_TIMEOUT_FAB:-290}" fused-a2a bench --ranks "$NGPU" --out "$OUT/fab" >"$OUT/fab.log" 2>&1
    echo "fused-a2a bench --ranks $NGPU: rc=$?" | tee -a "$OUT/summary.txt"
    grep -vE '^\[' "$OUT/fab.log" | tail -40
    ;;
  hyb)  # HybridEP: the torch GPU tests (incl. the pipelined combine), then the combine A/B
    gpu_tests "tests/test_gpu_hybrid.py" "torch" "${STEP_TIMEOUT_TEST:-200}"
    # FUSED_A2A_HYBRID_PIPELINE=1: two half slots, round k + 1 sent while round k is reduced
    # (session 6, unmeasured); run 26 without it: combine 2518 us at EP 4, N = 4096.
    for pipe in 0 1; do
      FUSED_A2A_HYBRID_PIPELINE=$pipe timeout 150 fused-a2a bench --ranks "$NGPU" --tokens 4096 \
        --mode hybrid --frontend all --out "$OUT/hyb_pipe$pipe" >"$OUT/hyb_pipe$pipe.log" 2>&1
      echo "hybrid bench, FUSED_A2A_HYBRID_PIPELINE=$pipe: rc=$?"
      grep -E "^(torch|jax)" "$OUT/hyb_pipe$pipe.log" | cut -c1-75
    done
    ;;
  sweep)  # issue 7's sweep over tokens per rank at EP 4 and EP 2 (torch, normal mode, with
    # all_to_all_single of the same rows), with the plots
    STEPS=build bash tools/gpu_check.sh | grep -E "build:"
    for ranks in 4 2; do
      timeout "${STEP_TIMEOUT_SWEEP:-150}" fused-a2a bench --ranks $ranks --tokens 128 256 512 \
        1024 2048 4096 8192 --mode normal --frontend torch --out "$OUT/sweep_ep$ranks" \
        >"$OUT/sweep_ep$ranks.log" 2>&1
      echo "sweep EP $ranks: rc=$?"
      grep -E "^(torch|N=|standard|tokens)" "$OUT/sweep_ep$ranks.log" | cut -c1-100 | tail -60
    done
    rm -f "$OUT/build.log"
    (cd "$OUT" && tar czf sweep.tgz --remove-files $(ls | grep -v '^sweep.tgz$'))
    ;;
  hybk)  # (~3 min) HybridEP at the defaults (HYBK_ENV: settings to compare, e.g.
    # "FUSED_A2A_HYBRID_OVERLAP=0"): kernel times, one dynamic-P call's CPU and GPU timeline, the
    # torch bench against normal mode + permute and NCCL
    STEPS=build bash tools/gpu_check.sh | grep -E "build:"
    hyb_kernels "default" "$OUT/hk_default.json"
    [[ -n ${HYBK_ENV:-} ]] && hyb_kernels "$HYBK_ENV" "$OUT/hk_env.json" $HYBK_ENV
    for tag in default ${HYBK_ENV:+env}; do  # one dynamic-P call's timeline
      [[ $tag == env ]] && set -- $HYBK_ENV || set --
      env "$@" timeout 80 python3 benchmarks/hybrid_kernels.py --world "$NGPU" --timeline \
        --out "$OUT/hk_timeline_$tag.json" 2>&1 | sed -n '/^timeline dispatch (dynamic P)/,/^dispatch (static P)/p' \
        | grep -E "timeline|HybridEP|cudaLaunch|cudaStreamSync|cudaMemcpy|gpu .*(notify|data_kernel)"
    done
    hyb_bench hyb
    [[ -n ${HYBK_ENV:-} ]] && hyb_bench hyb_env $HYBK_ENV
    rm -f "$OUT/build.log"
    ;;
  jaxk)  # (~3 min) where the JAX dispatch's time goes (run 90: 552-554 us at 48 SMs against the
    # torch static dispatch's 535-536, the padding ~2 us of it): the JAX loop's kernels and gaps
    # (benchmarks/jax_kernels.py, torch.profiler) at the worst and the exact capacity, then the
    # torch static dispatch's kernel times (bench_normal FA2A_BENCH_KERNELS=1) in the same call
    STEPS=build bash tools/gpu_check.sh | grep -E "build:"
    export FUSED_A2A_CUDA_BLOCKS=${FUSED_A2A_CUDA_BLOCKS:-48}
    for run in worst exact worst_count; do  # worst_count: FUSED_A2A_BENCH_JAX_TAIL=count
      tail=recv_x
      [[ $run == *_count ]] && tail=count
      FUSED_A2A_BENCH_JAX_TAIL=$tail timeout 120 python3 benchmarks/jax_kernels.py \
        --world "$NGPU" --capacity "${run%_count}" --out "$OUT/jaxk_$run.json" \
        >"$OUT/jaxk_$run.log" 2>&1
      echo "jax_kernels $run: rc=$?"
      grep -vE "^\s*$" "$OUT/jaxk_$run.log" | head -40 | cut -c1-120
    done
    jax_bench jax_count FUSED_A2A_BENCH_JAX_TAIL=count
    unset FUSED_A2A_CUDA_BLOCKS
    FA2A_BENCH_KERNELS=1 STEPS=bench BENCH_CASES=standard_sms48 BENCH_CASES_EP2= timeout 100 \
      bash tools/gpu_check.sh >/dev/null
    bench_kernel_times
    rm -f "$OUT/build.log"
    ;;
  s21b)  # (~7 min) the GPU tests at session 21's default (torch's output arena, 1024 MB on
    # CUDA): the torch suite's default, window (no arena) and arena variants, the stress and
    # graph tests, faults (a rank dies mid-op), concurrency (two groups, torch and JAX in one
    # process), the host counts' speculative paths (resize_ of an arena block)
    gpu_tests "tests/test_gpu_normal.py tests/test_gpu_faults.py tests/test_gpu_concurrency.py tests/test_gpu_host_counts.py" \
      "${S21_K:-(torch_gpu_matches and (default or window or arena)) or stress or graph or require or rank_dies or two_groups or torch_and_jax or mismatch or speculative}" \
      "${STEP_TIMEOUT_TEST:-420}" "passed|failed|FAILED|s call|GPU memory before"
    ;;
  prologue)  # (~3 min) the dispatch's prologue in the steady state (session 24): the diagnostic
    # build's trace of ten static dispatches back to back at 48 and 24 SMs, with the block
    # prologue's marks (the send lists' grid barrier, every layout in) and the timed loop's
    # kernels (torch.profiler); run 131 at 4a14427: barrier 7.6 / 7.3 us, layouts 10.0 / 21.6,
    # senders' start 12.0 / 23.9 (48 / 24 SMs)
    FA2A_BENCH_KERNELS=1 FA2A_BENCH_TRACE_CALLS=10 TRACE_CASES=${TRACE_CASES:-standard_sms48,standard} \
      bash tools/gpu_diag_trace.sh
    bench_kernel_times
    mv "$OUT/bench.json" "$OUT/trace.json"
    ;;
  fp8host)  # (~3 min) the eager FP8 dispatch's host path (session 28: at EP 2 a 133-us kernel
    # read 144-214 us eager, run 160; on CPU ranks the FP8 op's Python path costs what bf16's
    # does): the FP8 bench cases with their kernel times, then host_profile.py at N = 4096 (the
    # host time a call of the bf16 and FP8 static dispatch, cProfile's top functions)
    STEPS=build bash tools/gpu_check.sh | grep -E "build:"
    FA2A_BENCH_KERNELS=1 STEPS=bench BENCH_CASES=${BENCH_CASES:-standard_fp8,standard_fp8_sms48,standard_sms48} \
      timeout 200 bash tools/gpu_check.sh | grep -E "^  [a-z]|static_dispatch |nccl" | cut -c1-110
    bench_kernel_times
    timeout 200 python3 benchmarks/host_profile.py --world "$NGPU" --tokens 4096 --calls 50 \
      --top 25 --out "$OUT/host_profile.json" >"$OUT/host_profile.log" 2>&1
    echo "host_profile: rc=$?"
    grep -E "^op static|^raw static|^    core" "$OUT/host_profile.log"
    rm -f "$OUT/build.log"
    ;;
  s29)  # (~6 min at G = 4, build included) branch s29: a CUDA graph's capture takes recv_x
    # from the output arena's never-used memory (kept for the graph), so the captured static
    # dispatch writes its rows straight (run 156: 820 / 592 / 545 us captured against 524 / 508 /
    # 502 eager at 12 / 24 / 48 SMs, EP 4). Tests: the graph test (with the arena it now requires
    # direct rows), the arena's record_stream test, the torch suite's arena variant,
    # host counts' capture checks; then the bench's graph rows at 12 / 24 / 48 SMs and decode
    # (prediction: static_dispatch_graph within 10 us of the eager figure; decode's graph 56.5 ->
    # 45-52 at EP 4)
    gpu_tests "tests/test_gpu_normal.py tests/test_gpu_host_counts.py" \
      "${S29_K:-cuda_graph or record_stream or (torch_gpu_matches and arena) or captur}" \
      "${STEP_TIMEOUT_TEST:-300}"
    STEPS=bench BENCH_CASES=${BENCH_CASES:-standard_sms12,standard,standard_sms48,decode} \
      BENCH_CASES_EP2=${BENCH_CASES_EP2:-standard,decode} \
      timeout 200 bash tools/gpu_check.sh | grep -E "^  [a-z]|static_dispatch|cached_dispatch|combine" | cut -c1-110
    rm -f "$OUT/build.log"
    ;;
  s29b)  # (~6 min at G = 4) the FP8 dynamic dispatch through the static kernel (torch's
    # speculative path; run 163: its two kernels' notify took 56.5 us before a 347-us data
    # kernel, against 304 us for the static dispatch) and the prebuilt module with HybridEP
    # (session 29's first prebuilt one had the stubs: CMakeLists.txt now leaves them out of CUDA
    # builds). Tests: the FP8 dynamic rows (static / two_kernels / no_push), the speculative
    # paths, torch HybridEP at G = 2; then the whole bench at 24 SMs (prediction: torch
    # dispatch_fp8 360 -> 305-315 us, the rest as runs 164-165)
    gpu_tests "tests/test_gpu_static_rows.py tests/test_gpu_host_counts.py tests/test_gpu_hybrid.py" \
      "${S29B_K:-dynamic_fp8 or speculative_paths or (torch_gpu_hybrid and 2-g2_bf16_l2_exact-default-buffer)}" \
      "${STEP_TIMEOUT_TEST:-200}"
    FUSED_A2A_CUDA_BLOCKS=24 timeout "${STEP_TIMEOUT_FAB:-300}" fused-a2a bench --ranks "$NGPU" \
      --out "$OUT/fab" >"$OUT/fab.log" 2>&1
    echo "fused-a2a bench --ranks $NGPU: rc=$?" | tee -a "$OUT/summary.txt"
    grep -vE '^\[' "$OUT/fab.log" | grep -E "^(torch|jax) fused_a2a|^link|wire GB/s of it" | cut -c1-200
    ;;
  s29c)  # (~7 min at G = 4) the cached dispatch (combine's backward) as a static dispatch of the
    # handle's topk_idx and capacity (FUSED_A2A_CUDA_CACHED; run 162: 532.6 us through
    # dispatch_data against the static dispatch's 507.8 at 24 SMs). Tests: the torch suite default
    # / cached_data / arena, the JAX suite (direct, window, direct_cached_data), torch against JAX;
    # then the A/B (prediction: cached dispatch within 5 us of the static dispatch at 12 / 24 / 48
    # SMs, EP 4 and EP 2; decode graph cached 50.4 -> ~49)
    gpu_tests "tests/test_gpu_normal.py" \
      "${S29C_K:-(torch_gpu_matches and (default] or cached_data or arena])) or (jax_gpu_suite and (direct-default or direct-one or window-default or direct_cached_data or direct_layout)) or (torch_vs_jax and direct]) or same_bits}" \
      "${STEP_TIMEOUT_TEST:-300}"
    STEPS=bench BENCH_CASES=${BENCH_CASES:-standard_sms12,standard_sms12_cached_data,standard,standard_cached_data,standard_sms48,standard_sms48_cached_data,decode,decode_cached_data} \
      BENCH_CASES_EP2=${BENCH_CASES_EP2:-standard,standard_cached_data} \
      timeout 240 bash tools/gpu_check.sh | grep -E "^  [a-z]|static_dispatch |cached_dispatch|combine |nccl" | cut -c1-110
    rm -f "$OUT/build.log"
    ;;
  host)  # (~3 min) where a call's host time goes: host_profile.py at N = 128 and 4096 (no
    # cProfile) with the core's phases a call (fused_a2a_core.cuda_host_phases: to the route
    # scan's launch, the kernel's parameters, the launch; session 29: the raw core static
    # dispatch took 47 us of host time at N = 4096, the op 78.5, decode's eager static dispatch
    # 153 us against 49 in a graph)
    STEPS=build bash tools/gpu_check.sh | grep -E "build:"
    host_phases
    ;;
  s30a)  # (~8 min at G = 4) the session-29 commits no GPU ran: the arena's release_captures
    # (bench_normal.py after each graph; run 168: the fifth case's graphs ~550 us against ~502
    # eager) and the host phases timer; the torch FP8 dynamic dispatch's eager spread (runs 166 /
    # 169: 325.8 / 412.0 over a 307.5-us kernel). Prediction: every graph row within 5 us of its
    # eager row at 24 / 48 SMs in every case order; the host phases sum to about the raw call's
    # host time (47 us at N = 4096, run 163)
    gpu_tests "tests/test_gpu_normal.py" "${S30A_K:-cuda_graph or record_stream}" \
      "${STEP_TIMEOUT_TEST:-200}"
    STEPS=bench BENCH_CASES=${BENCH_CASES:-standard_sms12,standard_sms12_cached_data,standard,standard_cached_data,standard_sms48,decode,standard_fp8} \
      BENCH_CASES_EP2=${BENCH_CASES_EP2:-standard} \
      timeout 240 bash tools/gpu_check.sh | grep -E "^  [a-z]|static_dispatch|cached_dispatch|combine|dynamic_dispatch" | cut -c1-110
    rm -f "$OUT/build.log"
    host_phases
    ;;
  *) echo "PART must be tests, tests_rows, tests2, s21b, verify, fab, perf, sweep, hyb, hybk, jaxk, prologue, fp8host, host, s29, s29b, s29c or s30a" >&2
    exit 2 ;;
esac
