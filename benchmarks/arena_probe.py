"""Where torch's output arena (FUSED_A2A_TORCH_ARENA_MB) loses: per-call device times of the torch
dispatch and of the combine's backward (the cached dispatch), with the arena's blocks moved by a
spacer block of 0 / 256 / 768 MB allocated first, and each call's recv_x offset in the arena.

Runs 104-106 (4x H200) measured the arena's dispatch at 525-694 us and its combine_bwd at 583-630
against 537-540 without it, varying from run to run: a per-call list tells a bimodal cost (some
calls slow: a wait) from a uniform one (placement, memory), and the spacer tells placement.

    FUSED_A2A_TORCH_ARENA_MB=2048 FUSED_A2A_CUDA_BLOCKS=48 python3 benchmarks/arena_probe.py \
        --world 4 --out probe.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys


def _times(fn, iters: int) -> tuple[list[float], list]:
    import torch

    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    events = [
        (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
        for _ in range(iters)
    ]
    where = []
    for start, stop in events:
        start.record()
        out = fn()
        where.append(out)
        del out
        stop.record()
    torch.cuda.synchronize()
    return [round(s.elapsed_time(e) * 1e3, 1) for s, e in events], where


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

    phases = {}
    for spacer_mb in args.spacers if arena is not None else [0]:
        spacer = None
        if spacer_mb:
            spacer = _arena.empty(gid, (spacer_mb << 20,), torch.uint8, dev)
        row = {}
        for name, fn in (("dispatch", dispatch), ("combine_bwd", combine_bwd)):
            times, where = _times(fn, args.iters)
            row[name] = {
                "median_us": statistics.median(times),
                "min_us": min(times),
                "max_us": max(times),
                "times_us": times,
                "offsets": sorted({str(o) for o in where}),
            }
        row["free_mb"] = arena.free_bytes() / 2**20 if arena is not None else None
        phases[f"spacer_{spacer_mb}"] = row
        del spacer
    gathered = [None] * world
    dist.all_gather_object(gathered, phases)
    if rank == 0:
        out = {"arena_mb": os.environ.get("FUSED_A2A_TORCH_ARENA_MB", "0"), "ranks": gathered}
        with open(args.out, "w") as f:
            json.dump(out, f, indent=1)
        for phase, row in gathered[0].items():
            for name in ("dispatch", "combine_bwd"):
                meds = [g[phase][name]["median_us"] for g in gathered]
                r0 = row[name]
                print(
                    f"arena {out['arena_mb']} MB {phase} {name}: medians per rank {meds}, "
                    f"rank 0 min {r0['min_us']} max {r0['max_us']}, offsets {r0['offsets'][:4]}"
                )
                print(f"  rank 0 per call: {r0['times_us']}")
            print(f"  free MB {row['free_mb']}")
        sys.stdout.flush()
    dist.barrier()
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--world", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--iters", type=int, default=30)
    parser.add_argument(
        "--spacers", type=lambda s: [int(v) for v in s.split(",")], default=[0, 256, 768]
    )
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
