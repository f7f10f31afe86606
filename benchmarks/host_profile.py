"""Host-side cost of the torch frontend's calls (where the small-N figures of `fused-a2a bench`
go: at N <= 2048 the torch ops took 300-550 us a call on 4x H100 against 60-100 us on the GPU in
CUDA graphs, session 8, run 35).

    python benchmarks/host_profile.py [--world 4] [--tokens 128] [--calls 200] [--out FILE]

One process per rank (GPUs when present, else CPU ranks over gloo). Per op, rank 0 reports:
  host_us  the mean time a call takes to return (no sync inside the timed loop: for an op that
           does not sync, the host's own cost; the dynamic dispatch syncs once per call);
  wall_us  the mean time per call of the same loop including the final sync;
and cProfile's top functions by own time over the same calls; on GPUs, the core's host time a call
by phase (fused_a2a_core.cuda_host_phases: to the route scan's launch, the kernel's parameters, the
kernel's launch) for the dispatch and combine calls each op made. Every rank runs the same loops
(the ops are collective). --repeat R times every op R times and reports the medians (the runs'
values too). The Megatron helpers (fused_dispatch, fused_combine) are timed on both torch routes in
the same process, alternating: "[direct]" (the op bodies called directly in eager mode, the
default) and "[op route]" (FUSED_A2A_TORCH_DIRECT=0: every call through torch.library). Session 9's
A/B ran the routes in two processes, whose figures moved by 15-25 us for the ops neither route
touches.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import pstats
import statistics
import time

import torch
import torch.distributed as dist
from _spawn import init_rank, spawn_ranks


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_calls(fn, calls, device, group):
    for _ in range(10):
        fn()
    _sync(device)
    dist.barrier(group)
    host = 0.0
    start = time.perf_counter()
    for _ in range(calls):
        t0 = time.perf_counter()
        fn()
        host += time.perf_counter() - t0
    _sync(device)
    wall = time.perf_counter() - start
    return host / calls * 1e6, wall / calls * 1e6


def _profile(fn, calls, device, group, top):
    dist.barrier(group)
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(calls):
        fn()
    prof.disable()
    _sync(device)
    text = io.StringIO()
    pstats.Stats(prof, stream=text).sort_stats("tottime").print_stats(top)
    return text.getvalue()


PHASES = ("to the route scan", "parameters", "launch")  # fused_a2a_core.cuda_host_phases


def _core_phases(words):
    """cuda_host_phases' words -> {"dispatch" / "combine": {"calls", phase: us a call}}, the ops
    with calls only."""
    out = {}
    if not words:  # CPU buffers
        return out
    for i, op in enumerate(("dispatch", "combine")):
        calls, *ns = words[4 * i : 4 * i + 4]
        if calls:
            out[op] = {
                "calls": calls,
                **{ph: round(v / calls / 1e3, 2) for ph, v in zip(PHASES, ns, strict=True)},
            }
    return out


def _ops(args, rank, world, device, group):
    import torch_fused_a2a as tfa
    from torch_fused_a2a import _ops
    from torch_fused_a2a import fused_a2a as megatron

    n, h, k, e = args.tokens, args.hidden, args.topk, args.experts
    gen = torch.Generator().manual_seed(1000 + rank)
    idx = torch.topk(torch.rand(n, e, generator=gen), k, dim=1).indices.to(device)
    w = torch.rand(n, k, generator=gen).to(device)
    x = torch.randn(n, h, generator=gen).to(torch.bfloat16).to(device)
    buf = tfa.get_buffer(group, tfa.get_hidden_bytes(x), device)
    ops, gid, grank, sms = torch.ops.fused_a2a, buf.group_id, buf.rank, 24
    rx, _, _, _, counts, src, _, stats, _ = ops.dispatch(
        x, None, idx, w, e, gid, grank, world, -1, sms
    )
    cap, y = rx.shape[0], rx.clone()
    xg = x.clone().requires_grad_(True)
    handle = megatron.fused_dispatch(xg, idx, w, e, group)[4]
    # FP8 rows: e4m3 values and one f32 scale per 128 (session 28: the eager FP8 dispatch at EP 2
    # read 144-214 us over a 133-us kernel, run 160)
    x8 = x.to(torch.float8_e4m3fn)
    scales = x.float().abs().view(n, -1, 128).amax(-1).contiguous() if h % 128 == 0 else None
    fp8 = {} if scales is None else {
        "op static dispatch fp8": lambda: ops.dispatch(
            x8, scales, idx, w, e, gid, grank, world, cap, sms
        ),
        # the dynamic one (Megatron's route for FP8 rows; session 29: one kernel since
        # 3800c28, its eager figure 325.8 / 412.0 us in runs 166 / 169 over a 307.5-us kernel)
        "op dynamic dispatch fp8": lambda: ops.dispatch(
            x8, scales, idx, w, e, gid, grank, world, -1, sms
        ),
    }  # fmt: skip
    return {
        "op static dispatch": lambda: ops.dispatch(x, None, idx, w, e, gid, grank, world, cap, sms),
        **fp8,
        "op dynamic dispatch": lambda: ops.dispatch(x, None, idx, w, e, gid, grank, world, -1, sms),
        "op cached dispatch": lambda: ops.cached_dispatch(
            x, idx, counts, src, stats, e, gid, grank, sms
        ),
        "op combine": lambda: ops.combine(
            y, None, idx, counts, src, stats, e, n, False, gid, grank, sms
        ),
        "fused_dispatch": lambda: megatron.fused_dispatch(x, idx, w, e, group),
        "fused_dispatch (grad)": lambda: megatron.fused_dispatch(xg, idx, w, e, group),
        "fused_combine": lambda: megatron.fused_combine(y, group, handle),
        # The op's Python body without torch.library's wrapper (CustomOpDef._init_fn): the
        # difference to "op static dispatch" is the custom-op layer's cost.
        "raw static dispatch": lambda: _ops.dispatch._init_fn(
            x, None, idx, w, e, gid, grank, world, cap, sms
        ),
        "raw combine": lambda: _ops.combine._init_fn(
            y, None, idx, counts, src, stats, e, n, False, gid, grank, sms
        ),
        "get_buffer": lambda: tfa.get_buffer(group, tfa.get_hidden_bytes(x), device),
        "torch.empty x1": lambda: torch.empty((cap, h), dtype=x.dtype, device=device),
        "torch.zeros x1": lambda: torch.zeros(8, dtype=torch.int32, device=device),
    }


# The rows whose torch route FUSED_A2A_TORCH_DIRECT picks (torch_fused_a2a/_ops.py, run): timed
# under both values, alternating.
ROUTES = {"[direct]": "1", "[op route]": "0"}
ROUTED = ("fused_dispatch", "fused_dispatch (grad)", "fused_combine")


def _timed(fn, calls, repeat, device, group, route=None):
    """[(host_us, wall_us)] of `repeat` runs of one op, under FUSED_A2A_TORCH_DIRECT=route if
    given (restored afterwards)."""
    before = os.environ.get("FUSED_A2A_TORCH_DIRECT")
    try:
        if route is not None:
            os.environ["FUSED_A2A_TORCH_DIRECT"] = route
        return [_time_calls(fn, calls, device, group) for _ in range(max(1, repeat))]
    finally:
        if before is None:
            os.environ.pop("FUSED_A2A_TORCH_DIRECT", None)
        else:
            os.environ["FUSED_A2A_TORCH_DIRECT"] = before


def _summary(runs):
    """Medians over the runs, and the runs' values."""
    host, wall = [round(r[0], 1) for r in runs], [round(r[1], 1) for r in runs]
    return {
        "host_us": round(statistics.median(host), 1),
        "wall_us": round(statistics.median(wall), 1),
        "host_us_runs": host,
        "wall_us_runs": wall,
    }


def _worker(rank, world, port, args, queue):
    cuda = torch.cuda.is_available() and torch.cuda.device_count() >= world and not args.cpu
    device = init_rank(rank, world, port, cuda)
    group = dist.group.WORLD
    result = {"device": str(device), "world": world, "tokens": args.tokens, "ops": {}}
    import fused_a2a_core as core
    import torch_fused_a2a as tfa

    buf = tfa.get_buffer(group, args.hidden * 2, device)  # _ops' (bf16 rows)
    for name, fn in _ops(args, rank, world, device, group).items():
        core.cuda_host_phases(buf.group_id, buf.rank, True)  # the op's calls only (CUDA buffers)
        if name in ROUTED:  # both routes, alternating run by run
            runs = {label: [] for label in ROUTES}
            for _ in range(max(1, args.repeat)):
                for label, route in ROUTES.items():
                    runs[label] += _timed(fn, args.calls, 1, device, group, route)
            rows = {f"{name} {label}": _summary(r) for label, r in runs.items()}
        else:
            rows = {name: _summary(_timed(fn, args.calls, args.repeat, device, group))}
        # the core's host time a call by phase, over every route and run of the op (GPU only)
        phases = _core_phases(core.cuda_host_phases(buf.group_id, buf.rank, True))
        if phases:
            next(iter(rows.values()))["core_phases"] = phases
        result["ops"].update(rows)
        if rank == 0:
            for row, t in rows.items():
                print(
                    f"{row:36s} host {t['host_us']:8.1f} us  wall {t['wall_us']:8.1f} us"
                    f"  (runs: host {t['host_us_runs']})",
                    flush=True,
                )
            for op, ph in phases.items():
                text = ", ".join(f"{k} {v} us" for k, v in ph.items() if k != "calls")
                print(f"    core {op} a call ({ph['calls']} calls): {text}", flush=True)
        if args.profiles and not name.startswith("torch."):  # every rank: the ops are collective
            profile = _profile(fn, args.calls, device, group, args.top)
            if rank == 0:  # a routed op's profile goes with its first route's row
                result["ops"][next(iter(rows))]["profile"] = profile
                print(profile, flush=True)
    if rank == 0:
        queue.put(result)
    dist.barrier(group)
    dist.destroy_process_group()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--world", type=int, default=max(torch.cuda.device_count(), 2))
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--hidden", type=int, default=7168)
    parser.add_argument("--topk", type=int, default=8)
    parser.add_argument("--experts", type=int, default=256)
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--repeat", type=int, default=1, help="runs per op; medians reported")
    parser.add_argument("--top", type=int, default=14, help="cProfile rows per op")
    parser.add_argument("--profiles", type=int, default=1, help="0: timings only")
    parser.add_argument("--cpu", action="store_true", help="CPU ranks even with GPUs")
    parser.add_argument("--out", default="")
    args = parser.parse_args()
    result = spawn_ranks(_worker, args.world, args, timeout=600)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
