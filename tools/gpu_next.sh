#!/usr/bin/env bash
# The next GPU session's calls (plan in benchmarks/NOTES.md, "Next GPU session"), best on
# nvidia-h100-x4 (2 GPUs also work: the 3- and 4-GPU cases skip). One call per part:
#   PART=verify (~4 min): build; the normal-mode tests of both frontends (own rows by default,
#       senders, split), JAX HybridEP; bench A/B at EP = all GPUs and EP 2 (own rows, 32 SMs)
#   PART=hyb (~4 min): build; torch HybridEP GPU tests (incl. the pipelined combine); HybridEP
#       bench at N = 4096 with FUSED_A2A_HYBRID_PIPELINE=0 / 1
#   PART=fab (~4 min): the whole fused-a2a bench --ranks all GPUs
#   PART=tests (~5 min) and tests_rows (~6 min): the normal-mode GPU tests (without / only
#       test_static_big_rows); PART=tests2 (~5 min): HybridEP, host counts, faults, concurrency
#   PART=perf (~6 min): link probe, bench A/B, fused-a2a bench, traces with run 12's ablations
#   PART=jaxloop (~3 min): the JAX bench's loop with a known trip count vs a runtime one, and torch
#   PART=s12d (~5 min): session 12's defaults: fault, host-count and speculative-dispatch GPU
#       tests; the A/B against the former paths; the whole normal bench at 48 and 24 SMs
#   PART=sweep (~3 min): the N sweep at EP 4 and EP 2 (torch), with plots
#   PART=hybk (~3 min): HybridEP kernel times, timeline and bench at the defaults (and HYBK_ENV)
#   PART=s17 (~5 min): torch's speculative dispatch through the static kernel: tests and A/B
#   PART=s17h (~5 min): the HybridEP notify's host spin wait: tests, then hybk against the default
#   PART=s17b (~7 min): the GPU tests at session 17's default but big rows; PART=s17c (~6 min):
#       its A/B, the whole bench at 48 SMs, the JAX bench with the exact capacity
#   PART=jaxk (~3 min): the JAX dispatch loop's kernels and gaps against torch's kernel times
#   PART=s18 (~6 min): the JAX bench's device clocks (GPU test), then PART=fab at 48 SMs
#   PART=s20 (~6 min): the GPU tests of torch's output arena (FUSED_A2A_TORCH_ARENA_MB: direct
#       rows for torch) and of the ready message's direct rows (FUSED_A2A_CUDA_DIRECT_READY)
#   PART=s20b (~5 min, after s20 on the warm machine): their A/Bs at 48 SMs, the own rows under
#       direct rows (FUSED_A2A_CUDA_SELF), the link probe's two starts (events, barrier)
#   PART=s20c (~5 min): the arena's loss in run 104 split: host (free-list events), direct rows
#       across processes, or the arena's memory; bench_normal's kernel times with and without it
#   PART=s20d (~4 min): torch.profiler tables of the torch dispatch and combine_bwd without and
#       with the arena; the arena for the dispatch only
#   PART=s20e (~3 min): per-call times and block offsets of the arena's dispatch and combine_bwd
#   PART=s21 (~8 min): torch's arena at EP 4: its GPU tests (core and Python allocators), the
#       whole torch bench at 48 SMs (none, core, python, none, core), per-call times, and the
#       link probe with the dispatch's row pattern
#   PART=s21b (~7 min): the GPU tests at session 21's default (torch's output arena on CUDA)
#   PART=s21c (~5 min): the torch normal bench over the N sweep with arenas of 1024, 0, 2048 MB
#   PART=s22h (~4 min): torch.profiler tables and traces of the torch dispatch / combine's host
#       path at N = 128 and 4096; host_profile.py
#   PART=s23w (~9 min): the host's ticket wait (FUSED_A2A_HOST_WAIT spin / pause / sleep): the
#       speculative-path GPU tests (and session 22's int64 receive indices), the torch bench A/B
#       at N = 128 and 4096; S23W_TRACE=<mode>: every rank's trace too
#   PART=s24t (~5 min): GPU tests of the records' vector loads (FUSED_A2A_CUDA_META_VEC=1);
#   PART=s24b (~4 min): their A/B at 12, 24, 48 SMs, FP8 and decode
#   PART=s15b (~3 min): LAYOUT=dynamic (no ready round trip after dispatch_notify) by the
#       dynamic dispatch's kernel times
# Each writes under $OUT; pass FA2A_COMMIT=<sha> (the device copy has no usable git). One-off parts
# of earlier sessions (s7, s7b, claim, s8, s9, s9b, s10, s10b-d, s11, s11b-e, s12, s12b-c,
# s13, s13b-e, s14, s14b-e, s14x2, s14h, s15, s15c-g, s16, s19, s22t, s22, s22f, s22i) are in git
# history.
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

# The whole bench in normal mode at N = 4096 on AB_BLOCKS SMs (48) with one environment setting:
# ab_bench <frontend> <output name under $OUT> <VAR=value> [more bench arguments]; prints the
# frontend's dispatch and combine rows.
ab_bench() {
  local frontend=$1 name=$2 setting=$3
  shift 3
  env "$setting" FUSED_A2A_CUDA_BLOCKS="${AB_BLOCKS:-48}" timeout 110 fused-a2a bench \
    --ranks "$NGPU" --tokens 4096 --mode normal --frontend "$frontend" "$@" --out "$OUT/$name" \
    >"$OUT/$name.log" 2>&1
  echo "bench $frontend $setting: rc=$?"
  grep -E "^(torch|jax) .*(dispatch|combine)(_bwd)? |output arena" "$OUT/$name.log" | cut -c1-100
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

# Build, then the GPU tests of the files in $1 selected by -k $2 (timeout $3 s, default 420);
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
case "${PART:-tests}" in
  tests | tests_rows)  # the normal-mode GPU tests in two calls at G = 4 (one took more than
    # 420 s in run 72): tests = all but test_static_big_rows, tests_rows = it (20 cases; since
    # session 15 in two spawns, one per buffer size, instead of one spawn per case of ~14 s; the 18
    # test_static_fp8_rows cases likewise)
    if [[ $PART == tests ]]; then k="not big_rows"; else k="big_rows"; fi
    STEPS=build,test STEP_TIMEOUT_TEST=${STEP_TIMEOUT_TEST:-480} TEST_TIMEOUT_S=20 \
      PYTEST_ARGS="-m gpu --durations=10 tests/test_gpu_normal.py tests/test_gpu_static_rows.py" PYTEST_K="$k" \
      bash tools/gpu_check.sh
    grep -E "passed|failed|FAILED|s call" "$OUT/tests.log" | tail -16
    ;;
  tests2)  # the other GPU tests: HybridEP, host counts, faults, concurrency
    STEPS=build,test STEP_TIMEOUT_TEST=${STEP_TIMEOUT_TEST:-480} TEST_TIMEOUT_S=20 \
      PYTEST_ARGS="-m gpu tests/test_gpu_hybrid.py tests/test_gpu_host_counts.py tests/test_gpu_faults.py tests/test_gpu_concurrency.py" \
      bash tools/gpu_check.sh
    grep -E "passed|failed|FAILED" "$OUT/tests.log" | tail -12
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
    STEPS=build,test STEP_TIMEOUT_TEST=${STEP_TIMEOUT_TEST:-300} TEST_TIMEOUT_S=20 \
      PYTEST_ARGS="-m gpu --durations=12 tests/test_gpu_normal.py tests/test_gpu_static_rows.py tests/test_gpu_hybrid.py" \
      PYTEST_K="${VERIFY_K:-jax_gpu_hybrid_suite or torch_gpu_matches or jax_gpu_suite or bitwise or same_bits}" \
      bash tools/gpu_check.sh
    grep -E "passed|failed|FAILED|s call" "$OUT/tests.log" | tail -20
    # Who copies the own rows, again, now that chunks are 8 rows (NOTES, "Next steps after
    # session 6", step 1): the senders' pipes carry the own rows too (1/4 of all rows at EP 4,
    # 1/2 at EP 2); receivers, or half each (split); and 32 SMs (more bytes in flight).
    STEPS=bench BENCH_CASES=${BENCH_CASES:-standard,standard_selfrecv,standard_selfsplit,standard_sms32,decode} \
      BENCH_CASES_EP2=${BENCH_CASES_EP2:-standard,standard_selfrecv,standard_selfsplit,decode} \
      timeout 200 bash tools/gpu_check.sh | tail -64
    ;;
  fab)
    timeout "${STEP_TIMEOUT_FAB:-290}" fused-a2a bench --ranks "$NGPU" --out "$OUT/fab" >"$OUT/fab.log" 2>&1
    echo "fused-a2a bench --ranks $NGPU: rc=$?" | tee -a "$OUT/summary.txt"
    grep -vE '^\[' "$OUT/fab.log" | tail -40
    ;;
  hyb)  # HybridEP: the torch GPU tests (incl. the pipelined combine), then the combine A/B
    STEPS=build,test STEP_TIMEOUT_TEST=${STEP_TIMEOUT_TEST:-200} TEST_TIMEOUT_S=20 \
      PYTEST_ARGS="-m gpu --durations=6 tests/test_gpu_hybrid.py" PYTEST_K="torch" \
      bash tools/gpu_check.sh | grep -E "tests:|FAILED"
    # FUSED_A2A_HYBRID_PIPELINE=1: two half slots, round k + 1 sent while round k is reduced
    # (session 6, unmeasured); run 26 without it: combine 2518 us at EP 4, N = 4096.
    for pipe in 0 1; do
      FUSED_A2A_HYBRID_PIPELINE=$pipe timeout 150 fused-a2a bench --ranks "$NGPU" --tokens 4096 \
        --mode hybrid --frontend all --out "$OUT/hyb_pipe$pipe" >"$OUT/hyb_pipe$pipe.log" 2>&1
      echo "hybrid bench, FUSED_A2A_HYBRID_PIPELINE=$pipe: rc=$?"
      grep -E "^(torch|jax)" "$OUT/hyb_pipe$pipe.log" | cut -c1-75
    done
    ;;
  jaxloop)  # JAX timing loop: trip count known to XLA (default since session 9) vs a runtime
    # operand (FUSED_A2A_BENCH_JAX_COUNT=runtime: a host sync per iteration on GPU), twice each.
    # Prediction: the static loops match torch's figures (combine ~540 us at EP 4 on H100, run 35)
    # and move by less than +-20 us between runs; the runtime ones stay 40-140 us above.
    STEPS=build bash tools/gpu_check.sh | grep -E "build:"
    for count in static runtime static runtime; do
      FUSED_A2A_BENCH_JAX_COUNT=$count XLA_FLAGS="--xla_dump_to=$OUT/hlo_$count \
        --xla_dump_hlo_as_text --xla_dump_hlo_module_re=.*t_(combine|dispatch).*" timeout 120 \
        fused-a2a bench --ranks "$NGPU" --tokens 4096 --mode normal --frontend jax --no-peers \
        --out "$OUT/jax_$count" >"$OUT/jax_$count.log" 2>&1
      echo "JAX normal bench, loop count $count: rc=$?"
      grep -E "^jax" "$OUT/jax_$count.log" | cut -c1-75
      python3 tools/hlo_loop_check.py "$OUT/hlo_$count" --calls 1 | tail -1
      grep -ho '"known_trip_count":{"n":"[0-9]*"}' "$OUT/hlo_$count"/*after_optimizations.txt \
        | sort | uniq -c
      rm -rf "$OUT/hlo_$count"
    done
    timeout 120 fused-a2a bench --ranks "$NGPU" --tokens 4096 --mode normal --frontend torch \
      --no-peers --out "$OUT/torch" >"$OUT/torch.log" 2>&1
    echo "torch normal bench (same machine): rc=$?"
    grep -E "^torch" "$OUT/torch.log" | cut -c1-75
    # The torch routes' host cost, both in one process, 3 runs each (NOTES, after session 9, 3)
    timeout 120 python3 benchmarks/host_profile.py --world "$NGPU" --tokens 128 --profiles 0 \
      --repeat 3 --out "$OUT/host_routes.json" 2>&1 | grep -E "^(op|fused|raw)"
    rm -f "$OUT"/*/bench.png "$OUT/build.log" "$OUT/jax_runtime.log"  # 8 files come back at most
    ;;
  s12d)  # run 58's defaults again (a second run): the fault tests (a rank dies mid-dispatch,
    # the dynamic dispatch now waits for its counts after queueing the data kernel), the host
    # counts and speculative paths, the EP 2 torch suite; the A/B; the whole bench at 24 and 48 SMs
    STEPS=build,test STEP_TIMEOUT_TEST=${STEP_TIMEOUT_TEST:-300} TEST_TIMEOUT_S=20 \
      PYTEST_ARGS="-m gpu --durations=8 tests/test_gpu_faults.py tests/test_gpu_host_counts.py tests/test_gpu_normal.py tests/test_gpu_static_rows.py" \
      PYTEST_K="${S12_K:-rank_dies or host_counts or speculative or (torch_gpu_matches and 2-g2 and default)}" \
      bash tools/gpu_check.sh | grep -E "build:|tests:"
    grep -E "FAILED|Error|s call" "$OUT/tests.log" | head -12
    STEPS=bench BENCH_CASES=${BENCH_CASES:-standard,standard_exact,standard_nopdl,standard_sms48,standard_sms48_exact,standard_sms48_rhelp_pdl,standard_fp8,decode} \
      BENCH_CASES_EP2=${BENCH_CASES_EP2:-standard,standard_exact,standard_nopdl,standard_sms32,standard_sms48} \
      timeout 200 bash tools/gpu_check.sh | grep -E "^  [a-z]|static_dispatch |dynamic_dispatch |combine |nccl"
    for sms in 48 24; do
      FUSED_A2A_CUDA_BLOCKS=$sms timeout 150 fused-a2a bench --ranks "$NGPU" --tokens 4096 \
        --mode normal --frontend all --out "$OUT/fab_sms$sms" >"$OUT/fab_sms$sms.log" 2>&1
      echo "whole bench, $sms SMs: rc=$?"
      grep -E "^(torch|jax)" "$OUT/fab_sms$sms.log" | grep -v ragged | cut -c1-90
    done
    rm -f "$OUT/build.log" "$OUT"/*/bench.png
    (cd "$OUT" && tar czf s12d.tgz --remove-files $(ls | grep -v '^s12d.tgz$'))
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
  s17)  # (~5 min) torch's speculative dispatch through the static kernel
    # (FUSED_A2A_TORCH_SPECULATIVE=static, session 16, compile-checked): its GPU tests (the
    # speculative steps at G = 3; the fused-scan static kernels changed too: big rows, JAX), then
    # the A/B by the dynamic_dispatch row, each pair twice. Prediction: -10 to -14 us at 24 and
    # 48 SMs (551 -> 537-541 at 48, run 83), decode -5 to -10
    STEPS=build,test STEP_TIMEOUT_TEST=200 TEST_TIMEOUT_S=20 \
      PYTEST_ARGS="-m gpu tests/test_gpu_host_counts.py tests/test_gpu_normal.py tests/test_gpu_static_rows.py" \
      PYTEST_K="speculative or big_rows or jax_gpu_suite or same_bits" \
      bash tools/gpu_check.sh | grep -E "build:|tests:|FAILED"
    STEPS=bench BENCH_CASES=${BENCH_CASES:-standard_sms48,standard_sms48_spec1,standard,standard_spec1,decode,decode_spec1,standard_sms48,standard_sms48_spec1} \
      BENCH_CASES_EP2=${BENCH_CASES_EP2:-standard,standard_spec1} timeout 240 bash tools/gpu_check.sh \
      | grep -E "^  [a-z]|dynamic_dispatch |static_dispatch |nccl"
    rm -f "$OUT/build.log"
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
  s17b)  # (~7 min) the GPU tests at session 17's default (torch's speculative dispatch through
    # the static kernel): the normal-mode tests but big rows (unchanged kernels, run 87), HybridEP,
    # host counts (incl. a capture of each speculative path), faults, concurrency
    STEPS=build,test STEP_TIMEOUT_TEST=${STEP_TIMEOUT_TEST:-480} TEST_TIMEOUT_S=20 \
      PYTEST_ARGS="-m gpu tests/test_gpu_normal.py tests/test_gpu_static_rows.py tests/test_gpu_hybrid.py tests/test_gpu_host_counts.py tests/test_gpu_faults.py tests/test_gpu_concurrency.py" \
      PYTEST_K="not big_rows" bash tools/gpu_check.sh | grep -E "build:|tests:|FAILED"
    grep -E "GPU memory before/after" "$OUT/tests.log" | cut -c1-400
    ;;
  s17c)  # (~6 min) issue 4's figures at 48 SMs with session 17's default: the A/B against the
    # former two-kernel speculative path (the dynamic_dispatch row), the whole fused-a2a bench,
    # and the JAX normal bench with the exact capacity (what the worst-case padding costs)
    STEPS=build bash tools/gpu_check.sh | grep -E "build:"
    STEPS=bench BENCH_CASES=${BENCH_CASES:-standard_sms48,standard_sms48_spec2,standard,standard_spec2,standard_sms48,standard_sms48_spec2} \
      BENCH_CASES_EP2=${BENCH_CASES_EP2:-standard,standard_spec2} timeout 150 bash tools/gpu_check.sh \
      | grep -E "^  [a-z]|dynamic_dispatch |static_dispatch |nccl"
    export FUSED_A2A_CUDA_BLOCKS=48
    STEP_TIMEOUT_FAB=230 PART=fab bash tools/gpu_next.sh | grep -E "rc=|^(torch|jax)" | cut -c1-100
    jax_bench jaxcap FUSED_A2A_BENCH_JAX_CAPACITY=exact
    rm -f "$OUT/build.log" "$OUT"/*/*.png
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
  s18)  # (~6 min) the JAX bench timed by device clock reads (jax_fused_a2a.read_clock) instead of
    # wall times: its GPU test, then issue 4's whole table at 48 SMs (both frontends, NCCL)
    STEPS=build,test STEP_TIMEOUT_TEST=120 TEST_TIMEOUT_S=60 \
      PYTEST_ARGS="-m gpu tests/test_bench_jax_loop.py" bash tools/gpu_check.sh | grep -E "build:"
    grep -E "passed|failed|FAILED|Error" "$OUT/tests.log" | tail -8
    rm -f "$OUT/build.log"
    FUSED_A2A_CUDA_BLOCKS=48 STEP_TIMEOUT_FAB=300 PART=fab bash tools/gpu_next.sh
    ;;
  s20)  # (~6 min) torch's output arena (session 19, CPU-tested): recv_x in the buffer, so the
    # static kernel's senders write rows straight into it; and direct rows by the ready message
    # (FUSED_A2A_CUDA_DIRECT_READY, compile-checked: the cached dispatch of the combine's
    # backward, torch's exact dispatch_data). The GPU tests: the torch suite's "arena" and
    # "arena_layout" variants and the JAX suites' "direct_layout" (all with
    # FUSED_A2A_CUDA_DIRECT=require, so an unused path fails), the graph and 1,000-iteration
    # stress tests with the arena. Then PART=s20b on the same warm machine.
    STEPS=build,test STEP_TIMEOUT_TEST=420 TEST_TIMEOUT_S=20 \
      PYTEST_ARGS="-m gpu --durations=8 tests/test_gpu_normal.py" \
      PYTEST_K="arena or direct or graph" \
      bash tools/gpu_check.sh | grep -E "build:|tests:|FAILED"
    rm -f "$OUT/build.log"
    ;;
  s20b)  # (~5 min) the A/Bs at 48 SMs, N = 4096 (one pair each; S20_ARENA="0 2048 0 2048" etc.
    # for more). (1) torch without and with a 2 GB arena. Prediction: dispatch 539-540 ->
    # 522-525 us (run 100's JAX gain), combine unchanged. (2) JAX with the ready message's direct
    # rows. Prediction: combine_bwd (the cached dispatch) -10 to -16 us, the rest unchanged.
    # (3) Direct rows leave the receivers idle but for the records, while the senders' rings
    # still carry the own rows (a quarter of the bytes, SELF=send above 512 tokens): JAX with
    # the own rows by the senders (default) and the receivers. Prediction: recv -5 to -20 us (the
    # rings carry only the 159 MB that cross NVLink); no gain means the links, not the rings,
    # bound it (run 101: 6 sender warps or 96 SMs gained <= 3 us). (4) The link probe with both
    # starts (session 19's "barrier": every block of every GPU released together, each GPU timed
    # from release to its last block's end): is the 331-345 GB/s ceiling of the "events" start
    # inflated by GPUs running alone at the start and end?
    STEPS=build bash tools/gpu_check.sh | grep -E "build:"
    for mb in ${S20_ARENA:-0 2048}; do
      ab_bench torch "arena_$mb" FUSED_A2A_TORCH_ARENA_MB=$mb
    done
    for ready in ${S20_READY:-0 1}; do
      ab_bench jax "ready_$ready" FUSED_A2A_CUDA_DIRECT_READY=$ready --no-peers
    done
    for self in ${S20_WAYS:-send recv}; do
      ab_bench jax "self_$self" FUSED_A2A_CUDA_SELF=$self --no-peers
    done
    STEPS=probe bash tools/gpu_check.sh | grep -E "probe|bulk .*warps=4|simt16"
    rm -f "$OUT/build.log" "$OUT"/*/bench.png "$OUT"/*/bench.json
    ;;
  s20c)  # (~5 min) where torch's arena lost in run 104 (dispatch 540.5 -> 605.6 us, the cached
    # dispatch of combine_bwd 537.2 -> 630.4, host times +68 / +210 us): the free list's events
    # (fixed since: one per stream), the direct rows across processes, or the arena's memory. The
    # bench with no arena, the arena (direct rows), the arena through the window
    # (FUSED_A2A_CUDA_DIRECT=0); then bench_normal's kernel times (no host gaps) without and with it
    STEPS=build bash tools/gpu_check.sh | grep -E "build:"
    ab_bench torch arena_0 FUSED_A2A_TORCH_ARENA_MB=0
    ab_bench torch arena_2048 FUSED_A2A_TORCH_ARENA_MB=2048
    FUSED_A2A_CUDA_DIRECT=0 ab_bench torch arena_2048_window FUSED_A2A_TORCH_ARENA_MB=2048
    for mb in 0 2048; do
      FUSED_A2A_TORCH_ARENA_MB=$mb FA2A_BENCH_KERNELS=1 STEPS=bench BENCH_CASES=standard_sms48 \
        BENCH_CASES_EP2= timeout 100 bash tools/gpu_check.sh >/dev/null
      echo "bench_normal kernels, arena $mb MB:"
      bench_kernel_times
      mv "$OUT/bench.json" "$OUT/bench_kernels_$mb.json"
    done
    rm -f "$OUT/build.log" "$OUT"/*/bench.png "$OUT"/*/bench.json
    ;;
  s20d)  # (~4 min) run 105: the arena's cached dispatch (combine_bwd) lost 47 us through the
    # window too, host +80-118 us, while its dispatch gained 14 us: torch.profiler's host and
    # kernel tables of dispatch and combine_bwd (FA2A_BENCH_PROFILE) without and with the arena,
    # then the arena for the dispatch only (FUSED_A2A_TORCH_ARENA_CACHED=0)
    STEPS=build bash tools/gpu_check.sh | grep -E "build:"
    for mb in 0 2048; do
      FA2A_BENCH_PROFILE=dispatch,combine_bwd ab_bench torch "arena_$mb" FUSED_A2A_TORCH_ARENA_MB=$mb
    done
    FUSED_A2A_TORCH_ARENA_CACHED=0 ab_bench torch arena_2048_fwd FUSED_A2A_TORCH_ARENA_MB=2048
    rm -f "$OUT/build.log" "$OUT"/*/bench.png "$OUT"/*/bench.json
    ;;
  s20e)  # (~3 min) run 106: the arena's losses move between ops from run to run (dispatch
    # 525-694 us, combine_bwd 583-630, FP8 425-499; 537-540 / 367 without); run 107 (EP 2): the
    # dispatch 285 -> 545 us after a spacer, uniformly. Per-call device, host and allocation
    # times and offsets (benchmarks/arena_probe.py) in a plan that separates the block's offset
    # from the op before it: without the arena, with it, with it through the window (DIRECT=0)
    STEPS=build bash tools/gpu_check.sh | grep -E "build:"
    probe() {
      local tag=$1
      shift
      env FUSED_A2A_CUDA_BLOCKS=48 "$@" timeout 150 python3 benchmarks/arena_probe.py \
        --world "$NGPU" --out "$OUT/arena_probe_$tag.json" ${PROBE_PLAN:+--plan $PROBE_PLAN} 2>&1 \
        | grep -vE "^\[|Warning|warn" | tail -24 | cut -c1-330
    }
    probe 0 FUSED_A2A_TORCH_ARENA_MB=0
    probe 2048 FUSED_A2A_TORCH_ARENA_MB=2048
    probe 2048_window FUSED_A2A_TORCH_ARENA_MB=2048 FUSED_A2A_CUDA_DIRECT=0
    rm -f "$OUT/build.log"
    ;;
  s21)  # (~6 min) torch's arena at EP 4 with its allocation in the core (DLPack blocks, freed in
    # C++; the default with an arena since session 20) and in Python without CUDA events
    # (FUSED_A2A_TORCH_ARENA_ALLOC=python). Runs 104-106 lost where an op became host-bound (host
    # time >= device time: the allocation took 100-250 us of host time a call); run 110 (EP 2)
    # measured 52-60 us for the Python one without events. Prediction: dispatch 540 -> 522-527 us
    # with either, combine_bwd and FP8 unchanged (host 448 + the allocation < 537). The whole
    # torch bench at 48 SMs: none, core, python, none, core; then per-call times (arena_probe.py).
    # First the GPU tests with the arena (the core's allocator is new on GPUs; ~2 min)
    STEPS=build,test STEP_TIMEOUT_TEST=200 TEST_TIMEOUT_S=20 \
      PYTEST_ARGS="-m gpu tests/test_gpu_normal.py" PYTEST_K="arena" \
      bash tools/gpu_check.sh | grep -E "build:|tests:|FAILED"
    s21_run=0
    for alloc in ${S21_ALLOC:-none core python none core}; do
      s21_run=$((s21_run + 1))
      if [[ $alloc == none ]]; then
        ab_bench torch "arena_${s21_run}_none" FUSED_A2A_TORCH_ARENA_MB=0
      else
        FUSED_A2A_TORCH_ARENA_ALLOC=$alloc ab_bench torch "arena_${s21_run}_$alloc" \
          FUSED_A2A_TORCH_ARENA_MB=2048
      fi
    done
    for alloc in none core python; do
      mb=2048
      [[ $alloc == none ]] && mb=0
      FUSED_A2A_TORCH_ARENA_ALLOC=${alloc/none/core} FUSED_A2A_TORCH_ARENA_MB=$mb \
        FUSED_A2A_CUDA_BLOCKS=48 timeout 120 python3 benchmarks/arena_probe.py --world "$NGPU" \
        --plan d0,c0,d0 --out "$OUT/arena_probe_$alloc.json" 2>&1 \
        | grep -vE "^\[|Warning|warn" | tail -8 | cut -c1-330
    done
    # The link probe with the dispatch's pattern (one 14 KB row an item, contiguous and
    # gathered) beside its 64 KB chunks. Prediction: rows within 3% of the chunks (then the
    # pattern does not explain the direct dispatch's 305 GB/s wire against 331-345).
    STEPS=probe bash tools/gpu_check.sh | grep -E "probe:|rows|bulk .*warps=4"
    rm -f "$OUT/build.log" "$OUT"/*/bench.png "$OUT"/*/bench.json
    ;;
  s21b)  # (~7 min) the GPU tests at session 21's default (torch's output arena, 1024 MB on
    # CUDA): the torch suite's default, window (no arena) and arena variants, the stress and
    # graph tests, faults (a rank dies mid-op), concurrency (two groups, torch and JAX in one
    # process), the host counts' speculative paths (resize_ of an arena block)
    gpu_tests "tests/test_gpu_normal.py tests/test_gpu_faults.py tests/test_gpu_concurrency.py tests/test_gpu_host_counts.py" \
      "${S21_K:-(torch_gpu_matches and (default or window or arena)) or stress or graph or require or rank_dies or two_groups or torch_and_jax or mismatch or speculative}" \
      "${STEP_TIMEOUT_TEST:-420}" "passed|failed|FAILED|s call|GPU memory before"
    ;;
  s21c)  # (~5 min) run 113's whole bench lost with the default arena (1024 MB): torch dispatch
    # 561.3, combine_bwd 621.2 us (host 551) against 527-528 / 523-525 in run 111's A/B (2048 MB,
    # N = 4096 alone). The torch normal bench over the whole N sweep (one rank process runs every
    # N, as in PART=fab) at 48 SMs with the default, no arena and 2048 MB
    STEPS=build bash tools/gpu_check.sh | grep -E "build:"
    for mb in ${S21C_MB:-1024 0 2048}; do
      FUSED_A2A_TORCH_ARENA_MB=$mb FUSED_A2A_CUDA_BLOCKS=48 timeout 150 fused-a2a bench \
        --ranks "$NGPU" --tokens 128 512 1024 2048 4096 8192 --mode normal --frontend torch \
        --out "$OUT/sweep_arena_$mb" >"$OUT/sweep_arena_$mb.log" 2>&1
      echo "torch sweep, arena $mb MB: rc=$?"
      grep -E "^torch .*(dispatch|combine)|output arena" "$OUT/sweep_arena_$mb.log" | cut -c1-100
      grep -A4 "^GB/s dispatch" "$OUT/sweep_arena_$mb.log" | grep -E "^torch" | cut -c1-140
      rm -f "$OUT/sweep_arena_$mb"/*.png
    done
    rm -f "$OUT/build.log"
    ;;
  s22h)  # (~4 min) where the torch calls' host time goes: at N = 128 the dispatch took 444-473
    # us of host time a call in runs 116-117 (the combine 147-181) against JAX's ~60 us on the GPU,
    # and at N = 4096 a host path that long leaves the dispatch little slack (run 117: 553.8 us,
    # host 529, against 527.0 in run 116). torch.profiler tables (CUDA runtime calls included)
    # and Chrome traces with Python frames, rank 0, at N = 128 and 4096; host_profile.py's routes
    STEPS=build bash tools/gpu_check.sh | grep -E "build:"
    for n in 128 4096; do
      FA2A_BENCH_PROFILE=dispatch,combine FA2A_BENCH_PROFILE_DIR=$OUT FUSED_A2A_CUDA_BLOCKS=48 \
        timeout 150 fused-a2a bench --ranks "$NGPU" --tokens $n --mode normal --frontend torch \
        --no-peers --out "$OUT/prof_n$n" >"$OUT/prof_n$n.log" 2>&1
      echo "torch bench with profiles, N = $n: rc=$?"
      grep -E "^torch .*(dispatch|combine) " "$OUT/prof_n$n.log" | cut -c1-100
    done
    timeout 120 python3 benchmarks/host_profile.py --world "$NGPU" --tokens 128 --profiles 0 \
      --out "$OUT/host_routes.json" 2>&1 | grep -E "^(op|fused|raw|get|torch)" | cut -c1-120
    rm -f "$OUT/build.log" "$OUT"/*/bench.png
    (cd "$OUT" && tar czf s22h.tgz --remove-files $(ls | grep -v '^s22h.tgz$'))
    ;;
  s23w)  # (~9 min) the host's wait for the dispatch's ticket (FUSED_A2A_HOST_WAIT, session 22).
    # Run 120 (2x H200, EP 2, N = 128, traced): rank 1 ran its whole host path ~2x slower than
    # rank 0 (os.environ.get 25 us, torch.empty 20-35, the core's dispatch call 69 against 24)
    # while rank 0 spun ~360 us a call waiting for rank 1's layout: a busy spin taking the core
    # (or hardware-thread sibling) the rank behind needs. Prediction: with pause or sleep the
    # torch dispatch at N = 128 falls from ~460 us toward the ranks' own host path (~250-300 at
    # EP 4), the combine unchanged; at N = 4096 no change beyond noise (the host has slack). The
    # speculative-path GPU tests with each mode first (and the int64 receive indices the kernels
    # write since session 22: the static big rows and the torch suite, default variants), then
    # the A/B twice, then (S23W_TRACE=<mode>) every rank's trace. S23W_ONLY=tests / bench splits
    # it into two calls on the warm machine (one call can pass the device's 600 s limit)
    s23w_steps=build,test
    [[ ${S23W_ONLY:-} == bench ]] && s23w_steps=build
    STEPS=$s23w_steps STEP_TIMEOUT_TEST=240 TEST_TIMEOUT_S=20 \
      PYTEST_ARGS="-m gpu tests/test_gpu_host_counts.py tests/test_gpu_static_rows.py tests/test_gpu_normal.py" \
      PYTEST_K="speculative_paths or bad_host_wait or (static_big_rows and default) or (torch_gpu_matches and default)" \
      bash tools/gpu_check.sh | grep -E "build:|tests:|FAILED"
    # where the ranks' threads run: the CPUs, their topology, steal time; then during the first
    # N = 128 run per mode, which CPU each busy thread is on (ps's psr) once a second
    { nproc; lscpu; grep -E "^cpu " /proc/stat; } >"$OUT/cpus.txt" 2>&1
    [[ ${S23W_ONLY:-} == tests ]] && s23w_sizes="" || s23w_sizes="128 4096"
    for n in $s23w_sizes; do
      for wait in spin pause sleep spin pause sleep; do
        [[ $n == 4096 && -e "$OUT/wait_${wait}_n$n.log" ]] && continue  # once each at 4096
        if [[ $n == 128 && ! -e "$OUT/wait_${wait}_n$n.log" ]]; then
          (for i in $(seq 25); do date +%T; ps -eLo pid,tid,psr,pcpu,stat,comm --sort=-pcpu \
            | head -14; sleep 1; done) >"$OUT/threads_$wait.txt" 2>&1 &
        fi
        FUSED_A2A_HOST_WAIT=$wait FUSED_A2A_CUDA_BLOCKS=48 timeout 100 fused-a2a bench \
          --ranks "$NGPU" --tokens $n --mode normal --frontend torch --no-peers \
          --out "$OUT/wait_${wait}_n$n" >"$OUT/wait_${wait}_n$n.log" 2>&1
        echo "torch bench N = $n, FUSED_A2A_HOST_WAIT=$wait: rc=$?"
        grep -E "^torch .*(dispatch|combine) " "$OUT/wait_${wait}_n$n.log" | cut -c1-90
      done
    done
    wait
    grep -E "^cpu " /proc/stat >>"$OUT/cpus.txt"
    if [[ -n ${S23W_TRACE:-} ]]; then
      FUSED_A2A_HOST_WAIT=$S23W_TRACE FA2A_BENCH_PROFILE=dispatch \
        FA2A_BENCH_PROFILE_DIR=$OUT FUSED_A2A_CUDA_BLOCKS=48 timeout 100 fused-a2a bench \
        --ranks "$NGPU" --tokens 128 --mode normal --frontend torch --no-peers \
        --out "$OUT/prof_n128" >"$OUT/prof_n128.log" 2>&1
      echo "traced (FUSED_A2A_HOST_WAIT=$S23W_TRACE): rc=$?"
    fi
    rm -f "$OUT/build.log" "$OUT"/*/bench.png
    (cd "$OUT" && tar czf s23w.tgz --remove-files $(ls | grep -v '^s23w.tgz$'))
    ;;
  s24t)  # (~5 min) the GPU tests of the records' vector loads (FUSED_A2A_CUDA_META_VEC=1, session
    # 23, compile-checked): static big rows (also at 12 SMs: 32-row chunks, one batch of 64
    # items), FP8 rows (beside the vector scale loads; with the records kernel), the torch suite
    # (int64 indices; K % 4 != 0 falls back), the JAX suite and torch against JAX (int32), the
    # same bits across SM counts and chunk sizes
    gpu_tests "tests/test_gpu_static_rows.py tests/test_gpu_normal.py" \
      "${S24_K:-meta_vec or same_bits}" "${STEP_TIMEOUT_TEST:-420}"
    ;;
  s24b)  # (~4 min, after s24t on the warm machine) the A/B of the records' vector loads:
    # bench_normal at 12, 24 and 48 SMs, FP8 at 48, decode, each without and with. Prediction:
    # 12 SMs 560 -> 520-540 us (the metadata 26% of a sender warp's loop, about half of it the
    # word batches), 24 SMs -5 to -10, 48 SMs and decode within noise (link-bound / one chunk a
    # warp), FP8 -5 to -15 (its senders' metadata is the largest). If 12 SMs gains, make it the
    # default and run PART=fab at 48 SMs.
    STEPS=build bash tools/gpu_check.sh | grep -E "build:"
    STEPS=bench BENCH_CASES=${BENCH_CASES:-standard_sms12,standard_sms12_metavec,standard,standard_metavec,standard_sms48,standard_sms48_metavec,standard_fp8_sms48,standard_fp8_sms48_metavec,decode,decode_metavec,standard_sms12} \
      BENCH_CASES_EP2=${BENCH_CASES_EP2:-} timeout 300 bash tools/gpu_check.sh \
      | grep -E "^  [a-z]|static_dispatch |dynamic_dispatch |combine |nccl" | cut -c1-110
    rm -f "$OUT/build.log"
    ;;
  s17h)  # (~5 min) the dynamic HybridEP dispatch's host spinning on the notify's ticket
    # (FUSED_A2A_HYBRID_NOTIFY_WAIT=spin, session 16, compile-checked): its tests (the torch
    # HybridEP cases at G = 2 and 4, a rank dying mid-dispatch), then PART=hybk against the
    # default. Prediction: the data kernel starts 30-40 us after the notify's end (runs 84-85:
    # 74-106); the bench's HybridEP dispatch -30 to -60 us (990-1013 in runs 84-85)
    STEPS=build,test STEP_TIMEOUT_TEST=150 FA2A_GPU_TEST_TIMEOUT_S=15 \
      PYTEST_ARGS="-m gpu tests/test_gpu_hybrid.py tests/test_gpu_faults.py" \
      PYTEST_K="(torch and (4-g4 or 2-g2) and default-spin) or hybrid-dispatch-spin" \
      bash tools/gpu_check.sh | grep -E "build:|tests:|FAILED"
    mv "$OUT/tests.log" "$OUT/tests_spin.log"
    HYBK_ENV="FUSED_A2A_HYBRID_NOTIFY_WAIT=spin" PART=hybk bash tools/gpu_next.sh
    ;;
  s15b)  # (~3 min) LAYOUT=dynamic settled by kernel times: the dynamic dispatch's event times
    # carry the host's count wait (+-50 us between identical cases in run 68); its data kernel
    # should lose one NVLink round trip (predicted -4 to -8 us)
    STEPS=build bash tools/gpu_check.sh | grep -E "build:"
    FA2A_BENCH_KERNELS=1 STEPS=bench BENCH_CASES=${BENCH_CASES:-standard_sms48,standard_sms48_laydyn,standard,standard_laydyn} \
      BENCH_CASES_EP2= timeout 200 bash tools/gpu_check.sh >/dev/null
    bench_kernel_times
    rm -f "$OUT/build.log"
    ;;
  *) echo "PART must be tests, tests_rows, tests2, perf, verify, fab, hyb, jaxloop, s12d, sweep, hybk, s17, s17b, s17c, jaxk, s17h, s18 or s15b" >&2
    exit 2 ;;
esac
