#!/usr/bin/env bash
# The next GPU session's calls (plan in benchmarks/NOTES.md, "Next GPU session"), best on
# nvidia-h100-x4 (2 GPUs also work: the 3- and 4-GPU cases skip). One call per part:
#   PART=verify (~4 min): build; the normal-mode tests of both frontends (own rows by default,
#       senders, split), JAX HybridEP; bench A/B at EP = all GPUs and EP 2 (own rows, 32 SMs)
#   PART=hyb (~4 min): build; torch HybridEP GPU tests (incl. the pipelined combine); HybridEP
#       bench at N = 4096 with FUSED_A2A_HYBRID_PIPELINE=0 / 1
#   PART=fab (~4 min): the whole fused-a2a bench --ranks all GPUs
#   PART=tests (~7 min): every GPU test (normal, HybridEP, faults, concurrency)
#   PART=perf (~6 min): link probe, bench A/B, fused-a2a bench, traces with run 12's ablations
#   PART=jaxloop (~3 min): the JAX bench's loop with a known trip count vs a runtime one, and torch
#   PART=s11b (~8 min): session 10's zeroing and layout paths as defaults: GPU tests, one A/B
#       against the former paths with each op's kernel times, the whole bench
#   PART=s11c (~8 min): SM sweep 24-64 at EP 4 (bf16, FP8, decode; twice) and EP 2, then the whole
#       bench with the fastest SM count
#   PART=s11d (~5 min): FP8 with 6 / 8 sender warps, EP 2 with 32 / 64 SMs, traces at 24 / 48 SMs
# Each writes under $OUT; pass FA2A_COMMIT=<sha> (the device copy has no usable git). One-off parts
# of earlier sessions (s7, s7b, claim, s8, s9, s9b, s10, s10b-d, s11) are in git history.
set -uo pipefail
cd "$(dirname "$0")/.."
source tools/gpu_env.sh
export FA2A_COMMIT=${FA2A_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}
NGPU=$(python3 -c 'import torch; print(torch.cuda.device_count())')
case "${PART:-tests}" in
  tests)
    STEPS=build,test STEP_TIMEOUT_TEST=${STEP_TIMEOUT_TEST:-480} TEST_TIMEOUT_S=20 \
      PYTEST_ARGS="-m gpu tests/test_gpu_normal.py tests/test_gpu_hybrid.py tests/test_gpu_host_counts.py tests/test_gpu_faults.py tests/test_gpu_concurrency.py" \
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
  s11b)  # session 10's static paths as defaults (run 50): the GPU tests of the defaults and the
    # former paths, one A/B against the former defaults with each op's kernels (torch.profiler:
    # where the ~55 us around the senders' loop goes), then the whole bench (issue 4's figures).
    # Every source is touched first: the device keeps build/ between calls.
    find csrc -type f -exec touch {} +
    STEPS=build,test STEP_TIMEOUT_TEST=${STEP_TIMEOUT_TEST:-290} TEST_TIMEOUT_S=20 \
      PYTEST_ARGS="-m gpu tests/test_gpu_normal.py" \
      PYTEST_K="${S11_K:-(jax_gpu_suite and buffer-4) or bitwise or (torch_gpu_matches and 4-g4 and default and not subgroups) or (big_rows and not lean) or (fp8_rows and (default or ready)) or same_bits}" \
      bash tools/gpu_check.sh | grep -E "build:|tests:"
    grep -E "passed|failed|FAILED" "$OUT/tests.log" | tail -8
    FA2A_BENCH_KERNELS=1 STEPS=bench \
      BENCH_CASES=${BENCH_CASES:-standard,standard_ready,standard_worstcap,standard_worstcap_zf,decode,decode_ready,standard_fp8,standard_fp8_ready} \
      BENCH_CASES_EP2=${BENCH_CASES_EP2:-standard,standard_ready,standard_sms32} \
      timeout 200 bash tools/gpu_check.sh | grep -E "^  [a-z]|static_dispatch |combine |nccl"
    timeout 150 fused-a2a bench --ranks "$NGPU" --tokens 4096 --mode normal --out "$OUT/fab" \
      >"$OUT/fab.log" 2>&1
    echo "fused-a2a bench --ranks $NGPU --tokens 4096: rc=$?"
    grep -vE '^\[' "$OUT/fab.log" | tail -17
    rm -f "$OUT"/fab/*.png "$OUT/build.log"
    # One archive: more than the 8 files the device tool brings back
    (cd "$OUT" && tar czf s11b.tgz --remove-files $(ls | grep -v '^s11b.tgz$'))
    ;;
  s11c)  # SM sweep (issue 4's dispatch, issue 7's FP8 and EP 2 targets have no SM bound): bf16,
    # FP8 and decode at EP 4 with 24-64 SMs, twice, and EP 2 once; then the whole bench with the
    # SM count whose static dispatch was fastest at EP 4 (FUSED_A2A_CUDA_BLOCKS, both frontends).
    STEPS=build bash tools/gpu_check.sh | grep -E "build:"
    for rep in 1 2; do
      STEPS=bench BENCH_CASES=${BENCH_CASES:-standard,standard_sms32,standard_sms40,standard_sms48,standard_sms64,standard_fp8,standard_fp8_sms32,standard_fp8_sms48,standard_fp8_sms64,decode,decode_sms48} \
        BENCH_CASES_EP2=$([[ $rep == 1 ]] && echo "${BENCH_CASES_EP2:-standard,standard_sms32,standard_sms48,standard_sms64}") \
        timeout 240 bash tools/gpu_check.sh | grep -E "^  [a-z]|static_dispatch |combine |nccl"
      mv "$OUT/bench.json" "$OUT/bench_sweep$rep.json"
    done
    BEST_SMS=$(python3 -c '
import json, sys
rows = json.load(open(sys.argv[1]))["results"]
bf16 = [r for r in rows if "fp8" not in r["case"] and r["n"] == 4096 and "static_dispatch_us" in r]
print(min(bf16, key=lambda r: r["static_dispatch_us"])["sms"])' "$OUT/bench_sweep1.json")
    FUSED_A2A_CUDA_BLOCKS=$BEST_SMS timeout 150 fused-a2a bench --ranks "$NGPU" --tokens 4096 \
      --mode normal --out "$OUT/fab" >"$OUT/fab.log" 2>&1
    echo "fused-a2a bench --ranks $NGPU --tokens 4096, $BEST_SMS SMs: rc=$?"
    grep -vE '^\[' "$OUT/fab.log" | tail -17
    rm -f "$OUT"/fab/*.png "$OUT/build.log"
    (cd "$OUT" && tar czf s11c.tgz --remove-files $(ls | grep -v '^s11c.tgz$'))
    ;;
  s11d)  # FP8 with more sender warps at 24 SMs (run 52: FP8 gains with every SM, bf16 loses from
    # 24 SMs up), EP 2 with 32 / 64 SMs again, then traces of bf16 and FP8 at 24 and 48 SMs / 8
    # sender warps (where the bf16 dispatch loses with more SMs).
    STEPS=build,bench BENCH_CASES=${BENCH_CASES:-standard,standard_fp8,standard_fp8_s6,standard_fp8_s8,standard_fp8_sms64} \
      BENCH_CASES_EP2=${BENCH_CASES_EP2:-standard,standard_sms32,standard_sms64} \
      timeout 240 bash tools/gpu_check.sh | grep -E "build:|^  [a-z]|static_dispatch |combine |nccl"
    mv "$OUT/bench.json" "$OUT/bench_ab.json"
    TRACE_CASES=${TRACE_CASES:-standard,standard_sms48,standard_fp8,standard_fp8_s8} \
      timeout 200 bash tools/gpu_diag_trace.sh
    mv "$OUT/bench.json" "$OUT/trace.json"
    rm -f "$OUT/build.log"
    (cd "$OUT" && tar czf s11d.tgz --remove-files $(ls | grep -v '^s11d.tgz$'))
    ;;
  s11e)  # receivers deal the remote sources only when the senders copy the own rows (an empty own
    # column idled 1/4 of the receiver warps at EP 4, 1/2 at EP 2): GPU tests, then the A/B
    # against the former deal (FUSED_A2A_CUDA_RECV_COLS=all) at EP 4 and EP 2.
    find csrc -type f -exec touch {} +
    STEPS=build,test STEP_TIMEOUT_TEST=${STEP_TIMEOUT_TEST:-150} TEST_TIMEOUT_S=20 \
      PYTEST_ARGS="-m gpu tests/test_gpu_normal.py" \
      PYTEST_K="${S11_K:-(big_rows and own_senders) or (fp8_rows and default) or same_bits or (torch_gpu_matches and 4-g4_bf16_k8_e64_h7168-senders)}" \
      bash tools/gpu_check.sh | grep -E "build:|tests:"
    STEPS=bench BENCH_CASES=${BENCH_CASES:-standard,standard_rcall,standard_fp8,standard_fp8_rcall,standard_sms48} \
      BENCH_CASES_EP2=${BENCH_CASES_EP2:-standard,standard_rcall,standard_sms32} \
      timeout 150 bash tools/gpu_check.sh | grep -E "^  [a-z]|static_dispatch |combine |nccl"
    rm -f "$OUT/build.log"
    (cd "$OUT" && tar czf s11e.tgz --remove-files $(ls | grep -v '^s11e.tgz$'))
    ;;
  *) echo "PART must be tests, perf, verify, fab, hyb, jaxloop, s11b, s11c, s11d or s11e" >&2; exit 2 ;;
esac
