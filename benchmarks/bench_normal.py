"""Normal-mode benchmark on the GPUs of one host (torch frontend, one process per GPU, NCCL).

    python benchmarks/bench_normal.py --world 4 --out results.json [--cases standard,decode,...]

Per case (BENCHMARKS.md): N tokens per rank, H, top-K of E experts routed from uniform random
scores, bf16 rows, f32 weights. Times the static dispatch (count exchange + rows, one collective
call), the cached dispatch (rows only, as DeepEP's tuned figure), the dynamic dispatch (count
exchange, host sync, rows), combine, and NCCL all_to_all_single of the same rows, in the same
processes. Each op: CUDA events around every call, median of `iters` calls after warm-up, and the
same ops replayed from a CUDA graph (per-op time = replay time / ops per graph); the slowest rank
counts. Metrics: DeepEP's (bytes of recv_x incl. own tokens / time), wire (remote rows' bytes /
time), SMs.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch
import torch.distributed as dist
from _spawn import init_rank, spawn_ranks
from bench_cases import CASES

from torch_fused_a2a import _arena

# The FUSED_A2A_CUDA_* variables as the bench was started: each case starts from them and sets its
# own knobs on top, so one case's knobs never leak into the next (before session 8 a fixed list
# missed RECV_UNROLL, CLAIM and COMBINE_CLAIM, which then stayed set for the later cases).
_KNOB_PREFIXES = ("FUSED_A2A_CUDA_", "FUSED_A2A_TORCH_", "FUSED_A2A_BUFFER_")
BASE_KNOBS = {key: value for key, value in os.environ.items() if key.startswith(_KNOB_PREFIXES)}


def _set_case_env(env: dict) -> None:
    for key in [key for key in os.environ if key.startswith(_KNOB_PREFIXES)]:
        del os.environ[key]
    os.environ.update(BASE_KNOBS)
    os.environ.update(env)


def _events_median(fn, iters, warmup):
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    dist.barrier()
    evs = [
        (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
        for _ in range(iters)
    ]
    for start, stop in evs:
        start.record()
        fn()
        stop.record()
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) * 1e3 for s, e in evs)


def _graph_time(fn, reps, replays):
    """Per-op time of `reps` back-to-back calls captured in one CUDA graph (median replay)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(reps):
            fn()
    graph.replay()
    torch.cuda.synchronize()
    dist.barrier()
    times = []
    for _ in range(replays):
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        stop.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(stop) * 1e3 / reps)
        dist.barrier()
    del graph
    torch.cuda.synchronize()
    # the graph's arena blocks back for the next cases' graphs (session 29, run 168: the 48-SM
    # case's graphs, after four cases' in the same processes, read ~550 us against ~502 eager)
    _arena.release_captures()
    return statistics.median(times)


def _block_amax(x):
    """[N, H / 128] f32: the largest magnitude of each 128-value block of each row (the FP8
    cases' scales: a function of the row, so a receiver can recompute them)."""
    return x.float().view(x.shape[0], -1, 128).abs().amax(-1)


def _routing(n, e, k, rank, device):
    gen = torch.Generator(device=device).manual_seed(1000 + rank)
    scores = torch.rand(n, e, device=device, generator=gen)
    idx = torch.topk(scores, k, dim=1).indices.to(torch.int64)
    w = torch.rand(n, k, device=device, generator=gen)
    return idx, w


def _run_case(name, cfg, rank, world, iters, warmup, graphs):
    import torch_fused_a2a as tfa

    env = dict(cfg.get("env", {}))
    ablate = env.pop("FUSED_A2A_CUDA_ABLATE", None)  # only around the timed dispatches
    _set_case_env(env)
    device = torch.device("cuda", rank)
    n, h, k, e, sms = cfg["n"], cfg["h"], cfg["k"], cfg["e"], cfg["sms"]
    group = dist.group.WORLD
    idx, w = _routing(n, e, k, rank, device)
    x = torch.randn(n, h, device=device).to(torch.bfloat16)
    buf = tfa.get_buffer(group, tfa.get_hidden_bytes(x), device)
    ops = torch.ops.fused_a2a
    gid, grank = buf.group_id, buf.rank

    # The handle (and exact capacity) from one dynamic dispatch.
    rx, _, ridx, rw, counts, src, tpe, stats, _ = ops.dispatch(
        x, None, idx, w, e, gid, grank, world, -1, sms
    )
    y = rx.clone()
    cap = world * n if cfg.get("worst_cap") else rx.shape[0]
    own = int(counts[rank].item())

    fp8 = bool(cfg.get("fp8"))
    x_send, scales = (x.to(torch.float8_e4m3fn), _block_amax(x)) if fp8 else (x, None)

    def static_dispatch():
        ops.dispatch(x_send, scales, idx, w, e, gid, grank, world, cap, sms)

    def cached_dispatch():
        ops.cached_dispatch(x, idx, counts, src, stats, e, gid, grank, sms)

    def dynamic_dispatch():
        ops.dispatch(x_send, scales, idx, w, e, gid, grank, world, -1, sms)

    def combine():
        ops.combine(y, None, idx, counts, src, stats, e, n, False, gid, grank, sms)

    recv_w = rw.float().contiguous()

    def combine_weights():  # the dispatch backward's: the weights' gradients too, owner only
        ops.combine(y, recv_w, idx, counts, src, stats, e, n, True, gid, grank, sms)

    # NCCL all_to_all_single of the same rows (grouped by destination, splits known).
    owners = torch.where(idx >= 0, idx // (e // world), -1)
    in_rank = torch.stack([(owners == d).any(1) for d in range(world)], 1)
    send_idx = torch.cat([torch.nonzero(in_rank[:, d]).flatten() for d in range(world)])
    rows = x  # FP8: each row's e4m3 bytes and its scales' bytes, as one uint8 row
    if fp8:
        rows = torch.cat([x_send.view(torch.uint8), scales.view(torch.uint8)], 1)
    send = rows.index_select(0, send_idx)
    in_splits = in_rank.sum(0).to(torch.int64)
    out_splits = torch.empty_like(in_splits)
    dist.all_to_all_single(out_splits, in_splits)
    recv = torch.empty(int(out_splits.sum()), rows.shape[1], dtype=rows.dtype, device=device)
    in_l, out_l = in_splits.tolist(), out_splits.tolist()

    def nccl_a2a():
        dist.all_to_all_single(recv, send, out_l, in_l)

    res = dict(
        case=name,
        n=n,
        h=h,
        k=k,
        e=e,
        sms=sms,
        env=cfg.get("env", {}),
        num_recv=cap,
        own_rows=own,
        row_bytes=rows.shape[1] * rows.element_size(),
    )
    if ablate:
        static_dispatch, cached_dispatch, dynamic_dispatch = (
            _ablated(fn, ablate) for fn in (static_dispatch, cached_dispatch, dynamic_dispatch)
        )
    timed = dict(
        static_dispatch=static_dispatch,
        cached_dispatch=cached_dispatch,
        combine=combine,
        combine_weights=combine_weights,
        dynamic_dispatch=dynamic_dispatch,
        nccl_a2a=nccl_a2a,
    )
    if fp8:  # the bf16 ops would be timed against FP8 row bytes
        del timed["cached_dispatch"], timed["combine"], timed["combine_weights"]
    for key, fn in timed.items():
        res[f"{key}_us"] = _events_median(fn, iters, warmup)
    if graphs:
        for key in ("static_dispatch", "cached_dispatch", "combine"):
            if key in timed:
                res[f"{key}_graph_us"] = _graph_time(timed[key], 10, 5)
    # correctness spot check: combine(dispatch(x)) == count * x, exactly
    rx2 = ops.dispatch(x, None, idx, w, e, gid, grank, world, cap, sms)[0]
    rows_recv = y.shape[0]  # worst_cap: the rows past these are the zeroed padding
    out, _ = ops.combine(
        rx2[:rows_recv], None, idx, counts, src, stats, e, n, False, gid, grank, sms
    )
    padding_zero = not torch.any(rx2[rows_recv:].view(torch.int16))
    cnt = in_rank.sum(1).float()
    expect = ((x.float() * cnt[:, None]) + 0.0).to(torch.bfloat16)
    res["exact"] = torch.equal(out.view(torch.int16), expect.view(torch.int16)) and padding_zero
    if fp8:  # FP8 rows and scales arrive as the bf16 rows do, converted on the sender
        rx8, rs8 = ops.dispatch(x_send, scales, idx, w, e, gid, grank, world, cap, sms)[:2]
        same_rows = torch.equal(
            rx8.view(torch.uint8), rx2.to(torch.float8_e4m3fn).view(torch.uint8)
        )
        res["exact"] &= bool(same_rows and torch.equal(rs8, _block_amax(rx2)))
    if os.environ.get("FUSED_A2A_CUDA_TRACE"):
        res["trace"] = _trace_one(static_dispatch, gid, grank, sms)
        for key in ("combine", "combine_weights"):  # the latter: the dispatch backward's
            if key in timed:
                res[f"trace_{key}"] = _trace_one(
                    timed[key], gid, grank, sms, (TRACE_COMBINE_SENDER, TRACE_COMBINE_REDUCER)
                )
    if os.environ.get("FA2A_BENCH_KERNELS"):
        res["kernels"] = {
            key: _kernel_times(timed[key])
            # the dynamic dispatch's kernels too: its event times include the host's count wait,
            # which spread by ~50 us between identical cases (run 68)
            for key in (
                "static_dispatch",
                "cached_dispatch",
                "dynamic_dispatch",
                "combine",
                "nccl_a2a",
            )
            if key in timed  # the FP8 cases have no cached dispatch or combine
        }
    return res


def _ablated(fn, bits):
    """fn run with FUSED_A2A_CUDA_ABLATE=bits (read at each launch), so that the handle and the
    combine input of the case come from a complete dispatch."""

    def run():
        os.environ["FUSED_A2A_CUDA_ABLATE"] = bits
        try:
            fn()
        finally:
            os.environ.pop("FUSED_A2A_CUDA_ABLATE", None)

    return run


def _kernel_times(fn, calls=10):
    """The GPU kernels and copies of one call, from torch.profiler over `calls` calls:
    [(name, launches per call, mean us per launch)], longest first. A kernel that waits for a
    peer counts its wait."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    dist.barrier()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    rows = []
    for ev in prof.key_averages():
        total = getattr(ev, "device_time_total", None) or getattr(ev, "cuda_time_total", 0)
        if total and ev.count:
            rows.append((ev.key[:80], round(ev.count / calls, 2), round(total / ev.count, 1)))
    return sorted(rows, key=lambda r: -r[1] * r[2])


TRACE_SENDER = ("ready_wait", "chunk_start_wait", "meta", "pushes", "chunk_end", "drain")
TRACE_RECEIVER = ("flag_wait", "remote_copy", "own_copy", "zero_rows", "round_barrier")
# The combine's slots (csrc/kernels/cuda/state.h; "-": none): senders' round waits, pushes, chunk
# ends, drain; reducers' source lookups with their flag waits, reductions, round barriers.
TRACE_COMBINE_SENDER = ("ready_wait", "-", "-", "pushes", "chunk_end", "drain")
TRACE_COMBINE_REDUCER = ("flag_wait", "reduce", "-", "-", "round_barrier")
TRACE_SLOTS = 13  # csrc/kernels/cuda/common.cuh kTraceSlots


def _trace_one(fn, gid, grank, sms, names=(TRACE_SENDER, TRACE_RECEIVER)):
    """Per-warp phase times of a call of the dispatch, or with the combine's slot names of the
    combine (csrc/kernels/cuda/state.h): mean and max over the sender and the receiver warps;
    durations in SM cycles, start and finish times in ns (a receiver's start is its data phase
    start). FA2A_BENCH_TRACE_CALLS=K (default 1): K calls back to back after the host barrier,
    every slot divided by K (the kernel adds each call's values), so the ranks' start skew after
    the barrier weighs 1/K: the steady state of a timed loop."""
    import fused_a2a_core as core

    calls = max(1, int(os.environ.get("FA2A_BENCH_TRACE_CALLS", "1")))
    torch.cuda.synchronize()
    core.cuda_dispatch_trace(gid, grank, True)
    dist.barrier()
    for _ in range(calls):
        fn()
    torch.cuda.synchronize()
    words = [w / calls for w in core.cuda_dispatch_trace(gid, grank, True)]
    if not words:
        return {"error": "tracing is off in this build (-DFA2A_CUDA_TRACE=1)"}
    send_warps = int(os.environ.get("FUSED_A2A_CUDA_SEND_WARPS", 4))
    recv_warps = int(os.environ.get("FUSED_A2A_CUDA_RECV_WARPS", 12))
    slots = [
        words[i * TRACE_SLOTS : (i + 1) * TRACE_SLOTS] for i in range(len(words) // TRACE_SLOTS)
    ]
    senders = [slots[b * 16 + w] for b in range(sms) for w in range(send_warps)]
    receivers = [
        slots[b * 16 + w] for b in range(sms) for w in range(send_warps, send_warps + recv_warps)
    ]

    def stats(rows, names):
        out = {}
        for i, name in enumerate(names):
            if name == "-":
                continue
            vals = [r[i] for r in rows]
            out[name + "_cycles"] = [statistics.mean(vals), max(vals)]
        out["finish_ns"] = [statistics.mean(r[6] for r in rows), max(r[6] for r in rows)]
        out["chunks"] = [statistics.mean(r[7] for r in rows), max(r[7] for r in rows)]
        out["start_ns"] = [statistics.mean(r[8] for r in rows), max(r[8] for r in rows)]
        # the block prologue's marks (slots 11, 12): the send lists' grid barrier passed, every
        # source's layout read (the combine: the scan's barrier, every peer's message read)
        for slot, name in ((11, "scan_barrier_ns"), (12, "layouts_in_ns")):
            out[name] = [statistics.mean(r[slot] for r in rows), max(r[slot] for r in rows)]
        # the role's item loop minus its traced phases (slots 0-4 for both roles, and the
        # senders' claims, slot 10; their drain, slot 5, comes after the loop): time between and
        # around the phases
        untraced = [r[9] - sum(r[:5]) - r[10] for r in rows]
        out["loop_cycles"] = [statistics.mean(r[9] for r in rows), max(r[9] for r in rows)]
        out["untraced_cycles"] = [statistics.mean(untraced), max(untraced)]
        return out

    receiver = stats(receivers, names[1])
    # Receivers' slot 5: the last chunk flag seen (ns after kernel start). The copy tail is a
    # warp's finish minus that; the kernel's tail is the latest finish minus the latest flag.
    flagged = [r for r in receivers if r[5] > 0]
    if flagged:
        tails = [r[6] - r[5] for r in flagged]
        receiver["last_flag_ns"] = [
            statistics.mean(r[5] for r in flagged),
            max(r[5] for r in flagged),
        ]
        receiver["copy_tail_ns"] = [statistics.mean(tails), max(tails)]
        receiver["kernel_tail_ns"] = max(r[6] for r in receivers) - max(r[5] for r in flagged)
    sender = stats(senders, names[0])
    sender["claim_cycles"] = [statistics.mean(r[10] for r in senders), max(r[10] for r in senders)]
    return {"sender": sender, "receiver": receiver}


def _summarize(per_rank):
    first = per_rank[0]
    out = {k: first[k] for k in ("case", "n", "h", "k", "e", "sms", "env")}
    out["exact_all_ranks"] = all(r["exact"] for r in per_rank)
    if "trace" in first:
        out["trace_per_rank"] = [r["trace"] for r in per_rank]
    for key in ("trace_combine", "trace_combine_weights"):
        if key in first:
            out[f"{key}_per_rank"] = [r[key] for r in per_rank]
    if "kernels" in first:
        out["kernels_per_rank"] = [r["kernels"] for r in per_rank]
    recv_b = [r["num_recv"] * r["row_bytes"] for r in per_rank]
    wire_b = [(r["num_recv"] - r["own_rows"]) * r["row_bytes"] for r in per_rank]
    out["recv_bytes_per_rank_mean"] = statistics.mean(recv_b)
    out["wire_bytes_per_rank_mean"] = statistics.mean(wire_b)
    for key in [k for k in first if k.endswith("_us")]:
        t = max(r[key] for r in per_rank)  # slowest rank
        name = key[: -len("_us")]
        out[f"{name}_us"] = round(t, 2)
        out[f"{name}_deepep_GBps"] = round(statistics.mean(recv_b) / t / 1e3, 1)
        out[f"{name}_wire_GBps"] = round(statistics.mean(wire_b) / t / 1e3, 1)
    return out


def _worker(rank, world, port, args, queue):
    init_rank(rank, world, port, cuda=True)
    results = []
    for name in args.cases.split(","):
        try:
            res = _run_case(name, CASES[name], rank, world, args.iters, args.warmup, args.graphs)
        except Exception as exc:  # noqa: BLE001
            res = dict(case=name, error=f"{type(exc).__name__}: {exc}")
        gathered = [None] * world
        dist.all_gather_object(gathered, res)
        if rank == 0:
            if any("error" in g for g in gathered):
                summary = dict(case=name, errors=[g.get("error") for g in gathered])
            else:
                summary = _summarize(gathered)
            results.append(summary)
            print(json.dumps(summary), flush=True)
    if rank == 0:
        queue.put(results)
    dist.barrier()
    dist.destroy_process_group()


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--world", type=int, default=torch.cuda.device_count())
    parser.add_argument("--cases", default="standard,standard_sms12,decode")
    parser.add_argument("--iters", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--graphs", type=int, default=1)
    parser.add_argument("--out", default="")
    args = parser.parse_args()
    start = time.time()
    results = spawn_ranks(_worker, args.world, args, timeout=3000)
    meta = dict(
        world=args.world,
        device=torch.cuda.get_device_name(0),
        torch=torch.__version__,
        date=time.strftime("%Y-%m-%d %H:%M:%S"),
        seconds=round(time.time() - start, 1),
        commit=os.environ.get("FA2A_COMMIT", ""),
    )
    doc = dict(meta=meta, results=results)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(doc, f, indent=1)
    return 0 if all("errors" not in r for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
