"""Where torch's output arena (FUSED_A2A_TORCH_ARENA_MB) loses: per-call device and host times of
the torch dispatch and of the combine's backward (the cached dispatch), and of the arena's
allocation, in a plan of steps (--plan: d = dispatch, c = combine_bwd, each after a spacer block of
that many MB, which moves the arena's blocks), with each call's recv_x offset in the arena.

Runs 104-106 (4x H200) measured the arena's dispatch at 525-694 us and its combine_bwd at 583-630
against 537-540 without it, varying from run to run: a per-call list tells a bimodal cost (some
calls slow: a wait) from a uniform one (placement, memory), and the spacer tells placement.

    FUSED_A2A_TORCH_ARENA_MB=2048 FUSED_A2A_CUDA_BLOCKS=48 python3 benchmarks/arena_probe.py \
        --world 4 --plan d0,d256,d0,c0,d0 --out probe.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time


def _times(fn, iters: int) -> tuple[list[float], list[float], list]:
    """Per call: device us (events), host us (perf_counter around the call), fn's result."""
    import torch

    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    events = [
        (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
        for _ in range(iters)
    ]
    host, where = [], []
    for start, stop in events:
        start.record()
        t0 = time.perf_counter()
        out = fn()
        host.append(round((time.perf_counter() - t0) * 1e6, 1))
        where.append(out)
        del out
        stop.record()
    torch.cuda.synchronize()
    return [round(s.elapsed_time(e) * 1e3, 1) for s, e in events], host, where


def rank_main(rank: int, world: int, port: int, args) -> None:
    import torch
    import torch.distributed as dist

    import torch_fused_a2a as tfa
    from torch_fused_a2a import _arena, fused_a2a

    torch.cuda.set_device(rank)
    dist.init_process_group(
        "nccl",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world,
        device_id=torch.device("cuda", rank),
    )
    grp = dist.group.WORLD
    dev = torch.device("cuda", rank)
    gen = torch.Generator(device="cpu").manual_seed(7 + rank)
    n, h, e, k = args.tokens, 7168, 256, 8
    x = torch.randn(n, h, generator=gen).to(torch.bfloat16).to(dev)
    idx = torch.argsort(torch.rand(n, e, generator=gen), 1)[:, :k].contiguous().to(dev)
    w = torch.rand(n, k, generator=gen).to(dev)
    recv_x, _, _, _, handle = tfa.fused_dispatch(x, idx, w, e, grp)
    gid = fused_a2a._buffer.group_id
    arena = _arena.find(gid)
    y = recv_x.detach().clone().requires_grad_(True)
    out2, _ = tfa.fused_combine(y, grp, handle)

    def offset(t):
        if arena is None:
            return None
        at = t.data_ptr() - arena.address
        return at if 0 <= at < arena.size else "torch"

    def dispatch():
        return offset(tfa.fused_dispatch(x, idx, w, e, grp)[0])

    def combine_bwd():
        return offset(torch.autograd.grad(out2, y, x, retain_graph=True)[0])

    # The arena's allocation time (host), per call
    alloc_us = []
    if arena is not None:
        tensor = arena.tensor

        def timed_tensor(*a, **kw):
            t0 = time.perf_counter()
            try:
                return tensor(*a, **kw)
            finally:
                alloc_us.append(round((time.perf_counter() - t0) * 1e6, 1))

        arena.tensor = timed_tensor
        _arena.STEP_US = {}  # the allocation's host time per step
    ops = {"d": ("dispatch", dispatch), "c": ("combine_bwd", combine_bwd)}
    phases = {}
    for step_no, step in enumerate(args.plan):
        name, fn = ops[step[0]]
        spacer_mb = int(step[1:] or 0) if arena is not None else 0
        spacer = None
        if spacer_mb:
            spacer = _arena.empty(gid, (spacer_mb << 20,), torch.uint8, dev)
        del alloc_us[:]
        if _arena.STEP_US is not None:
            _arena.STEP_US.clear()
        times, host, where = _times(fn, args.iters)
        phases[f"{step_no}:{name}@{spacer_mb}"] = {
            "median_us": statistics.median(times),
            "min_us": min(times),
            "max_us": max(times),
            "host_median_us": statistics.median(host),
            "alloc_median_us": statistics.median(alloc_us) if alloc_us else None,
            "alloc_max_us": max(alloc_us) if alloc_us else None,
            "alloc_steps_us": {
                step: round(statistics.median(us), 1) for step, us in (_arena.STEP_US or {}).items()
            },
            "times_us": times,
            "offsets": sorted({str(o) for o in where}),
        }
        del spacer
    gathered = [None] * world
    dist.all_gather_object(gathered, phases)
    if rank == 0:
        out = {"arena_mb": os.environ.get("FUSED_A2A_TORCH_ARENA_MB", "0"), "ranks": gathered}
        with open(args.out, "w") as f:
            json.dump(out, f, indent=1)
        for phase, row in gathered[0].items():
            meds = [g[phase]["median_us"] for g in gathered]
            print(
                f"arena {out['arena_mb']} MB {phase}: device medians per rank {meds}; rank 0: "
                f"min {row['min_us']} max {row['max_us']} host {row['host_median_us']} alloc "
                f"{row['alloc_median_us']} (max {row['alloc_max_us']}) offsets {row['offsets'][:3]}"
            )
            print(f"  rank 0 per call: {row['times_us'][:12]}; alloc steps {row['alloc_steps_us']}")
        sys.stdout.flush()
    dist.barrier()
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--world", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--iters", type=int, default=30)
    # steps: d = dispatch, c = combine_bwd, each followed by the spacer's MB (allocated first)
    parser.add_argument("--plan", type=lambda s: s.split(","), default="d0,d256,d0,c0,d0,c256,d768")
    parser.add_argument("--out", default="arena_probe.json")
    args = parser.parse_args()
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(rank_main, args=(args.world, port, args), nprocs=args.world, join=True)


if __name__ == "__main__":
    main()
