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
#   PART=s14 (~6 min) / s14b (~5 min): SCAN=fused (the route scan's second pass in the
#       dispatch and combine kernels) and LAYOUT=dynamic (no ready round trip after
#       dispatch_notify): GPU tests / the A/B; s14x2, s14h, s14c, s14d, s14e: session 14's calls
#   PART=s15 (~6 min): the HybridEP overlap mode's tests, kernel times and bench (NOTES, "Next
#       steps after session 14"); s15c: the HybridEP dynamic dispatch's timeline; s15d: the
#       overlap mode by its number of sending blocks; s15e: its tests at G = 4, the plain data
#       kernel's send / receive split; s15f: the overlap default at G >= 4; s15g: the HybridEP
#       items' header loads at once
# Each writes under $OUT; pass FA2A_COMMIT=<sha> (the device copy has no usable git). One-off parts
# of earlier sessions (s7, s7b, claim, s8, s9, s9b, s10, s10b-d, s11, s11b-e, s12, s12b-c,
# s13, s13b-e) are in git history.
set -uo pipefail
cd "$(dirname "$0")/.."
source tools/gpu_env.sh
export FA2A_COMMIT=${FA2A_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}
NGPU=$(python3 -c 'import torch; print(torch.cuda.device_count())')
case "${PART:-tests}" in
  tests | tests_rows)  # the normal-mode GPU tests in two calls at G = 4 (one took more than
    # 420 s in run 72): tests = all but test_static_big_rows (26 cases of ~14 s), tests_rows = it
    if [[ $PART == tests ]]; then k="not big_rows"; else k="big_rows"; fi
    STEPS=build,test STEP_TIMEOUT_TEST=${STEP_TIMEOUT_TEST:-480} TEST_TIMEOUT_S=20 \
      PYTEST_ARGS="-m gpu --durations=10 tests/test_gpu_normal.py" PYTEST_K="$k" \
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
      PYTEST_ARGS="-m gpu --durations=12 tests/test_gpu_normal.py tests/test_gpu_hybrid.py" \
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
      PYTEST_ARGS="-m gpu --durations=8 tests/test_gpu_faults.py tests/test_gpu_host_counts.py tests/test_gpu_normal.py" \
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
  s14)  # session 13's compile-checked paths, GPU tests (~6 min): the route scan's second pass
    # in the static dispatch and combine kernels (FUSED_A2A_CUDA_SCAN=fused: static rows incl.
    # 25-26 tiles over 24 blocks, same bits) and the dynamic data kernel without its ready round
    # trip (FUSED_A2A_CUDA_LAYOUT=dynamic: the torch suites at G = 2-4, the speculative steps)
    STEPS=build,test STEP_TIMEOUT_TEST=420 TEST_TIMEOUT_S=20 \
      PYTEST_ARGS="-m gpu --durations=8 tests/test_gpu_normal.py tests/test_gpu_host_counts.py" \
      PYTEST_K="(big_rows and (default or fused_scan)) or layout_dynamic or speculative or same_bits_across" \
      bash tools/gpu_check.sh | grep -E "build:|tests:"
    grep -E "FAILED|Error|s call" "$OUT/tests.log" | head -16
    rm -f "$OUT/build.log"
    ;;
  s14b)  # their A/B at EP 4 / 2 (~5 min), FP8 at 48 SMs with / without PDL, and the kernels of
    # the 48-SM fused case (torch.profiler)
    STEPS=build bash tools/gpu_check.sh | grep -E "build:"
    STEPS=bench BENCH_CASES=${BENCH_CASES:-standard,standard_fscan,standard_fscan_pdl,standard_laydyn,standard_sms48,standard_sms48_fscan,standard_sms48_laydyn,standard_fp8_sms48,standard_fp8_sms48_pdl,decode,decode_fscan,decode_laydyn,sweep_n8192,n8192_fscan} \
      BENCH_CASES_EP2=${BENCH_CASES_EP2:-standard_sms48,standard_sms48_fscan,standard_sms48_laydyn} \
      timeout 240 bash tools/gpu_check.sh | grep -E "^  [a-z]|static_dispatch|combine |nccl"
    mv "$OUT/bench.json" "$OUT/bench_ab.json"
    FA2A_BENCH_KERNELS=1 STEPS=bench BENCH_CASES=standard_sms48_fscan BENCH_CASES_EP2= \
      timeout 60 bash tools/gpu_check.sh >/dev/null
    python3 - "$OUT/bench.json" <<'PY'
import json, sys
for r in json.load(open(sys.argv[1]))["results"]:
    for op, rows in r.get("kernels_per_rank", [{}])[0].items():
        print(f"  kernels {r['case']} {op}: " + "; ".join(f"{n[:40]} x{c} {t}" for n, c, t in rows))
PY
    mv "$OUT/bench.json" "$OUT/bench_kernels.json"
    rm -f "$OUT/build.log"
    (cd "$OUT" && tar czf s14b.tgz --remove-files $(ls | grep -v '^s14b.tgz$'))
    ;;
  s14x2)  # when only 2 GPUs are lent (~8 min): s14's tests at G = 2, then the A/B at EP 2
    STEPS=build,test STEP_TIMEOUT_TEST=300 TEST_TIMEOUT_S=20 \
      PYTEST_ARGS="-m gpu --durations=8 tests/test_gpu_normal.py tests/test_gpu_host_counts.py" \
      PYTEST_K="(big_rows and (default or fused_scan)) or layout_dynamic or speculative or same_bits_across" \
      bash tools/gpu_check.sh | grep -E "build:|tests:"
    grep -E "FAILED|Error|s call" "$OUT/tests.log" | head -16
    STEPS=bench BENCH_CASES=${BENCH_CASES:-standard,standard_fscan,standard_laydyn,standard_sms48,standard_sms48_fscan,standard_sms48_laydyn,standard_fscan_pdl,decode,decode_fscan,decode_laydyn} \
      BENCH_CASES_EP2= timeout 200 bash tools/gpu_check.sh | grep -E "^  [a-z]|static_dispatch|dynamic_dispatch|combine |nccl"
    rm -f "$OUT/build.log"
    ;;
  s14h)  # (~8 min) the other GPU tests (tests2: HybridEP, host counts, faults, concurrency) on
    # session 13's defaults, then HybridEP against normal mode + permute at N = 4096 (torch, JAX):
    # not measured since run 26 (4096 buffer rows, before every normal-mode change since)
    STEPS=build,test STEP_TIMEOUT_TEST=${STEP_TIMEOUT_TEST:-330} TEST_TIMEOUT_S=20 \
      PYTEST_ARGS="-m gpu --durations=6 tests/test_gpu_hybrid.py tests/test_gpu_host_counts.py tests/test_gpu_faults.py tests/test_gpu_concurrency.py" \
      bash tools/gpu_check.sh | grep -E "build:|tests:|FAILED"
    timeout 150 fused-a2a bench --ranks "$NGPU" --tokens 4096 --mode hybrid --frontend all \
      --out "$OUT/hyb" >"$OUT/hyb.log" 2>&1
    echo "hybrid bench N = 4096: rc=$?"
    grep -E "^(torch|jax)" "$OUT/hyb.log" | cut -c1-90
    rm -f "$OUT/build.log"
    ;;
  s14c)  # (~8 min at EP 4) HybridEP: a dispatched row read once for all its experts, own rows
    # from x / y instead of through the own slot: GPU tests (torch, JAX) and the bench against
    # normal mode + permute at N = 4096 (run 69, EP 2: 1238 / 1952 us); then, with 4 GPUs,
    # s14b's A/B of SCAN=fused / LAYOUT=dynamic at EP 4
    STEPS=build,test STEP_TIMEOUT_TEST=200 TEST_TIMEOUT_S=20 \
      PYTEST_ARGS="-m gpu --durations=4 tests/test_gpu_hybrid.py" bash tools/gpu_check.sh \
      | grep -E "build:|tests:|FAILED"
    timeout 150 fused-a2a bench --ranks "$NGPU" --tokens 4096 --mode hybrid --frontend all \
      --out "$OUT/hyb" >"$OUT/hyb.log" 2>&1
    echo "hybrid bench N = 4096: rc=$?"
    grep -E "^(torch|jax)" "$OUT/hyb.log" | cut -c1-90
    if [[ $NGPU -ge 4 ]]; then
      STEPS=bench BENCH_CASES=${BENCH_CASES:-standard,standard_fscan,standard_sms48,standard_sms48_fscan,standard_sms48_laydyn,standard_fp8_sms48,standard_fp8_sms48_pdl,decode,decode_fscan} \
        BENCH_CASES_EP2= timeout 200 bash tools/gpu_check.sh | grep -E "^  [a-z]|static_dispatch |dynamic_dispatch |combine |nccl"
    fi
    rm -f "$OUT/build.log"
    ;;
  s14d)  # (~7 min at EP 4) HybridEP's kernel times (benchmarks/hybrid_kernels.py), its bench at
    # N = 4096 with the pipelined rounds (FUSED_A2A_HYBRID_PIPELINE=1) against run 70's default;
    # with 4 GPUs first the HybridEP GPU tests and bench at G = 4, then s14b's EP 4 A/B
    STEPS=build bash tools/gpu_check.sh | grep -E "build:"
    timeout 120 python3 benchmarks/hybrid_kernels.py --world "$NGPU" --out "$OUT/hybrid_kernels.json" \
      2>&1 | grep -vE "^\[|Warning" | tail -40
    for pipe in ${HYB_PIPES:-0 1}; do
      FUSED_A2A_HYBRID_PIPELINE=$pipe timeout 150 fused-a2a bench --ranks "$NGPU" --tokens 4096 \
        --mode hybrid --frontend torch --out "$OUT/hyb_pipe$pipe" >"$OUT/hyb_pipe$pipe.log" 2>&1
      echo "hybrid bench (torch), FUSED_A2A_HYBRID_PIPELINE=$pipe: rc=$?"
      grep -E "^torch" "$OUT/hyb_pipe$pipe.log" | cut -c1-90
    done
    if [[ $NGPU -ge 4 ]]; then
      STEPS=test STEP_TIMEOUT_TEST=150 TEST_TIMEOUT_S=20 PYTEST_K="4" \
        PYTEST_ARGS="-m gpu tests/test_gpu_hybrid.py" bash tools/gpu_check.sh | grep -E "tests:|FAILED"
      STEPS=bench BENCH_CASES=${BENCH_CASES:-standard,standard_fscan,standard_sms48,standard_sms48_fscan,standard_sms48_laydyn,standard_fp8_sms48,standard_fp8_sms48_pdl,decode,decode_fscan} \
        BENCH_CASES_EP2= timeout 200 bash tools/gpu_check.sh | grep -E "^  [a-z]|static_dispatch |dynamic_dispatch |combine |nccl"
    fi
    rm -f "$OUT/build.log"
    ;;
  s14e)  # (~4 min on 2 GPUs) HybridEP: the two-pass ordinals and FUSED_A2A_HYBRID_OVERLAP=1 (the
    # dispatch's sending and receiving blocks at once): torch GPU tests, the bench with overlap
    STEPS=build,test STEP_TIMEOUT_TEST=120 TEST_TIMEOUT_S=20 \
      PYTEST_ARGS="-m gpu tests/test_gpu_hybrid.py" PYTEST_K="torch and (overlap or default-buffer)" \
      bash tools/gpu_check.sh | grep -E "build:|tests:|FAILED"
    for overlap in ${HYB_OVERLAP:-1}; do
      FUSED_A2A_HYBRID_OVERLAP=$overlap timeout 100 fused-a2a bench --ranks "$NGPU" --tokens 4096 \
        --mode hybrid --frontend torch --out "$OUT/hyb_ov$overlap" >"$OUT/hyb_ov$overlap.log" 2>&1
      echo "hybrid bench (torch), FUSED_A2A_HYBRID_OVERLAP=$overlap: rc=$?"
      grep -E "^torch" "$OUT/hyb_ov$overlap.log" | cut -c1-90
    done
    rm -f "$OUT/build.log"
    ;;
  s15)  # (~7 min) the HybridEP overlap modes (FUSED_A2A_HYBRID_OVERLAP=1 / 3): torch GPU tests with
    # a 15 s op timeout (run 73's step printed nothing in 80 s: a hang names its op, phase and
    # rank), then kernel times and the bench with the knob 0 / 1 / 3 on this machine
    STEPS=build,test STEP_TIMEOUT_TEST=150 FA2A_GPU_TEST_TIMEOUT_S=15 \
      PYTEST_ARGS="-m gpu --durations=6 tests/test_gpu_hybrid.py" \
      PYTEST_K="torch and (overlap or default-buffer)" bash tools/gpu_check.sh \
      | grep -E "build:|tests:|FAILED"
    grep -E "Error|error|timed out|phase" "$OUT/tests.log" | sort | uniq -c | sort -rn | head -12
    for overlap in ${HYB_OVERLAP:-0 1 3}; do  # bits: 1 dispatch, 2 combine
      FUSED_A2A_HYBRID_OVERLAP=$overlap timeout 90 python3 benchmarks/hybrid_kernels.py \
        --world "$NGPU" --out "$OUT/hybrid_kernels_ov$overlap.json" 2>&1 | grep -vE "^\[" \
        | grep -E "^[a-z]|data_kernel|ordinal|notify" | cut -c1-100
      FUSED_A2A_HYBRID_OVERLAP=$overlap timeout 100 fused-a2a bench --ranks "$NGPU" --tokens 4096 \
        --mode hybrid --frontend torch --out "$OUT/hyb_ov$overlap" >"$OUT/hyb_ov$overlap.log" 2>&1
      echo "hybrid bench (torch), FUSED_A2A_HYBRID_OVERLAP=$overlap: rc=$?"
      grep -E "^torch" "$OUT/hyb_ov$overlap.log" | cut -c1-90
      rm -f "$OUT/hyb_ov$overlap"/*.png
    done
    rm -f "$OUT/build.log"
    (cd "$OUT" && tar czf s15.tgz --remove-files $(ls | grep -v '^s15.tgz$'))
    ;;
  s15b)  # (~3 min) LAYOUT=dynamic settled by kernel times: the dynamic dispatch's event times
    # carry the host's count wait (+-50 us between identical cases in run 68); its data kernel
    # should lose one NVLink round trip (predicted -4 to -8 us)
    STEPS=build bash tools/gpu_check.sh | grep -E "build:"
    FA2A_BENCH_KERNELS=1 STEPS=bench BENCH_CASES=${BENCH_CASES:-standard_sms48,standard_sms48_laydyn,standard,standard_laydyn} \
      BENCH_CASES_EP2= timeout 200 bash tools/gpu_check.sh >/dev/null
    python3 - "$OUT/bench.json" <<'PY'
import json, sys
for r in json.load(open(sys.argv[1]))["results"]:
    for op, rows in r.get("kernels_per_rank", [{}])[0].items():
        print(f"  kernels {r['case']} {op}: " + "; ".join(f"{n[:40]} x{c} {t}" for n, c, t in rows[:4]))
PY
    rm -f "$OUT/build.log"
    ;;
  s15c)  # (~6 min) HybridEP's dynamic dispatch: where its time goes outside the kernels (run 74:
    # 1369 us at EP 2 against ~830 us of kernels), one call's CPU and GPU events in order; the
    # fan-out kernel a warp per pair; the notify's pre-pass reused by the data op. Torch HybridEP
    # GPU tests first, the bench at N = 4096 last
    STEPS=build,test STEP_TIMEOUT_TEST=150 FA2A_GPU_TEST_TIMEOUT_S=15 \
      PYTEST_ARGS="-m gpu --durations=4 tests/test_gpu_hybrid.py" \
      PYTEST_K="torch and not overlap" bash tools/gpu_check.sh | grep -E "build:|tests:|FAILED"
    timeout 100 python3 benchmarks/hybrid_kernels.py --world "$NGPU" --timeline \
      --out "$OUT/hybrid_kernels.json" 2>&1 | grep -vE "^\[|Warning" | head -150
    timeout 100 fused-a2a bench --ranks "$NGPU" --tokens 4096 --mode hybrid --frontend torch \
      --out "$OUT/hyb" >"$OUT/hyb.log" 2>&1
    echo "hybrid bench (torch): rc=$?"
    grep -E "^torch" "$OUT/hyb.log" | cut -c1-90
    rm -f "$OUT/build.log" "$OUT"/hyb/*.png
    ;;
  s15d)  # (~5 min) the HybridEP overlap mode by its number of sending blocks (run 75, EP 4: the
    # plain data kernel is ~480 us of NVLink sends then ~500 us of permute, serial; the permute
    # looks SM-bound, the sends link-bound from ~12 SMs): data kernel and combine kernel times
    # with FUSED_A2A_HYBRID_OVERLAP=0, then =3 with 6 / 8 / 12 of 24 blocks sending; the bench
    STEPS=build bash tools/gpu_check.sh | grep -E "build:"
    for cfg in ${HYB_CFGS:-0:12 3:6 3:8 3:12 3:16}; do
      FUSED_A2A_HYBRID_OVERLAP=${cfg%%:*} FUSED_A2A_HYBRID_SEND_BLOCKS=${cfg##*:} timeout 80 \
        python3 benchmarks/hybrid_kernels.py --world "$NGPU" --out "$OUT/hk_${cfg/:/_}.json" 2>&1 \
        | grep -E "^[a-z]|data_kernel|combine_kernel" | tr '\n' ' ' | sed "s/^/overlap:send $cfg  /" \
        | cut -c1-400
      echo
    done
    for cfg in ${HYB_BENCH_CFGS:-0:12 3:8}; do
      FUSED_A2A_HYBRID_OVERLAP=${cfg%%:*} FUSED_A2A_HYBRID_SEND_BLOCKS=${cfg##*:} timeout 100 \
        fused-a2a bench --ranks "$NGPU" --tokens 4096 --mode hybrid --frontend torch \
        --out "$OUT/hyb_${cfg/:/_}" >"$OUT/hyb_${cfg/:/_}.log" 2>&1
      echo "hybrid bench (torch), overlap:send $cfg: rc=$?"
      grep -E "^torch" "$OUT/hyb_${cfg/:/_}.log" | cut -c1-90
      rm -f "$OUT/hyb_${cfg/:/_}"/*.png
    done
    rm -f "$OUT/build.log"
    (cd "$OUT" && tar czf s15d.tgz --remove-files $(ls | grep -v '^s15d.tgz$'))
    ;;
  s15e)  # (~6 min) the HybridEP overlap mode at G = 4 (tests with a 15 s op timeout: never passed
    # there), the plain data kernel's send / receive split (FUSED_A2A_HYBRID_ABLATE=1: no value
    # copies on the send side, =2: none on the receive side), the overlap mode with 10 / 12 / 14 of
    # 24 blocks sending (run 76: 8 / 12 / 16 took 1257 / 941 / 1250 us against 980 plain), and
    # the bench with the plain and the 12-block overlap mode (a second run of run 76's)
    STEPS=build,test STEP_TIMEOUT_TEST=150 FA2A_GPU_TEST_TIMEOUT_S=15 \
      PYTEST_ARGS="-m gpu --durations=4 tests/test_gpu_hybrid.py" \
      PYTEST_K="torch and overlap" bash tools/gpu_check.sh | grep -E "build:|tests:|FAILED"
    grep -E "timed out|phase" "$OUT/tests.log" | sort | uniq -c | sort -rn | head -6
    for cfg in ${HYB_CFGS:-0:12:0 0:12:1 0:12:2 3:10:0 3:12:0 3:14:0}; do
      IFS=: read -r ov sb ab <<<"$cfg"
      FUSED_A2A_HYBRID_OVERLAP=$ov FUSED_A2A_HYBRID_SEND_BLOCKS=$sb FUSED_A2A_HYBRID_ABLATE=$ab \
        timeout 80 python3 benchmarks/hybrid_kernels.py --world "$NGPU" \
        --out "$OUT/hk_${ov}_${sb}_${ab}.json" 2>&1 | grep -E "^[a-z]|data_kernel|combine_kernel" \
        | tr '\n' ' ' | sed "s/^/overlap:send:ablate $cfg  /" | cut -c1-400
      echo
    done
    for cfg in ${HYB_BENCH_CFGS:-0:12 3:12}; do
      FUSED_A2A_HYBRID_OVERLAP=${cfg%%:*} FUSED_A2A_HYBRID_SEND_BLOCKS=${cfg##*:} timeout 100 \
        fused-a2a bench --ranks "$NGPU" --tokens 4096 --mode hybrid --frontend torch \
        --out "$OUT/hyb_${cfg/:/_}" >"$OUT/hyb_${cfg/:/_}.log" 2>&1
      echo "hybrid bench (torch), overlap:send $cfg: rc=$?"
      grep -E "^torch" "$OUT/hyb_${cfg/:/_}.log" | cut -c1-90
      rm -f "$OUT/hyb_${cfg/:/_}"/*.png
    done
    rm -f "$OUT/build.log"
    (cd "$OUT" && tar czf s15e.tgz --remove-files $(ls | grep -v '^s15e.tgz$'))
    ;;
  s15f)  # (~5 min) the overlap mode as the default at G >= 4: the torch HybridEP GPU tests at G = 4
    # (default, rows8, pipelined and the plain rounds) and the JAX HybridEP suite at G = 4; the
    # torch bench at the default
    STEPS=build,test STEP_TIMEOUT_TEST=200 FA2A_GPU_TEST_TIMEOUT_S=15 \
      PYTEST_ARGS="-m gpu --durations=4 tests/test_gpu_hybrid.py" \
      PYTEST_K="(torch and 4-g4 and not overlap) or (jax and 4)" bash tools/gpu_check.sh \
      | grep -E "build:|tests:|FAILED"
    timeout 70 fused-a2a bench --ranks "$NGPU" --tokens 4096 --mode hybrid --frontend torch \
      --out "$OUT/hyb" >"$OUT/hyb.log" 2>&1
    echo "hybrid bench (torch): rc=$?"
    grep -E "^torch" "$OUT/hyb.log" | cut -c1-90
    rm -f "$OUT/build.log" "$OUT"/hyb/*.png
    ;;
  s15g)  # (~4 min) the HybridEP items' header loads issued together and the send side's row head
    # loaded before the routing is known (the per-item chain, ~212 us of run 77's 977 us plain
    # data kernel at EP 4): torch GPU tests at G = 4 (default and plain rounds), kernel times plain
    # and default (overlap at G >= 4), the bench at the default. Prediction: plain data kernel
    # 977 -> 850-900 us, the overlap default 935 -> 830-880
    STEPS=build,test STEP_TIMEOUT_TEST=90 FA2A_GPU_TEST_TIMEOUT_S=15 \
      PYTEST_ARGS="-m gpu tests/test_gpu_hybrid.py" \
      PYTEST_K="torch and 4-g4 and (default-buffer or default-plain)" bash tools/gpu_check.sh \
      | grep -E "build:|tests:|FAILED"
    for ov in 0 3; do
      FUSED_A2A_HYBRID_OVERLAP=$ov timeout 60 python3 benchmarks/hybrid_kernels.py --world "$NGPU" \
        --out "$OUT/hk_ov$ov.json" 2>&1 | grep -E "^[a-z]|data_kernel|combine_kernel" \
        | tr '\n' ' ' | sed "s/^/overlap $ov  /" | cut -c1-400
      echo
    done
    timeout 60 fused-a2a bench --ranks "$NGPU" --tokens 4096 --mode hybrid --frontend torch \
      --out "$OUT/hyb" >"$OUT/hyb.log" 2>&1
    echo "hybrid bench (torch): rc=$?"
    grep -E "^torch" "$OUT/hyb.log" | cut -c1-90
    rm -f "$OUT/build.log" "$OUT"/hyb/*.png
    ;;
  *) echo "PART must be tests, tests2, perf, verify, fab, hyb, jaxloop, s12d, sweep, s14, s14b, s14x2, s14h, s14c, s14d, s14e, s15, s15b, s15c, s15d, s15e, s15f, s15g or tests_rows" >&2
    exit 2 ;;
esac
