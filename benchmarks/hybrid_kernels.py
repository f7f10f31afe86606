"""Kernel times of the torch HybridEP ops on GPUs (torch.profiler): which kernel of a HybridEP
dispatch or combine takes the time. Standard case (N = 4096, H = 7168, top-8 of 256 experts,
bf16), one process per GPU.

    python benchmarks/hybrid_kernels.py --world 2 --out hybrid_kernels.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _spawn import init_rank, spawn_ranks  # noqa: E402
from bench_normal import _kernel_times  # noqa: E402


def _routing(n, num_experts, top_k, seed):
    """routing_map [n, E] bool with top_k experts a token, probs [n, E] f32 on those."""
    gen = torch.Generator().manual_seed(seed)
    scores = torch.rand((n, num_experts), generator=gen)
    idx = scores.topk(top_k, dim=1).indices
    routing_map = torch.zeros((n, num_experts), dtype=torch.bool)
    routing_map.scatter_(1, idx, True)
    probs = torch.where(routing_map, torch.rand((n, num_experts), generator=gen), 0.0)
    return routing_map, probs.float()


def _timeline(fn, calls=3):
    """One call's events in time order (the last of `calls`, from torch.profiler with CPU and
    CUDA activities): [(start us, duration us, "cpu" or "gpu", name)], starts relative to the
    call's start. CPU events are the top-level ops and the CUDA runtime calls; a gap between
    them is Python time. Shows where a call's device time goes when it is not in kernels."""
    from torch.profiler import ProfilerActivity, profile, record_function

    torch.cuda.synchronize()
    dist.barrier()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for i in range(calls):
            with record_function(f"timeline_call_{i}"):
                fn()
        torch.cuda.synchronize()
    events = list(prof.events())
    last = [e for e in events if e.name == f"timeline_call_{calls - 1}"]
    if not last:
        return []
    t0, t1 = last[0].time_range.start, last[0].time_range.end
    rows = []
    for e in events:
        start, end = e.time_range.start, e.time_range.end
        gpu = str(e.device_type).endswith("CUDA")
        if gpu:
            keep = start >= t0
        else:
            top = e.cpu_parent is not None and e.cpu_parent.name.startswith("timeline_call_")
            keep = t0 <= start <= t1 and (top or e.name.startswith("cuda"))
        if keep:
            rows.append((round(start - t0, 1), round(end - start, 1), "gpu" if gpu else "cpu",
                         e.name[:70]))  # fmt: skip
    rows.sort()
    return [r for r in rows if r[0] <= (t1 - t0) + 5000][:80]


def _worker(rank, world, port, args, queue):
    import torch_fused_a2a as tfa

    cuda = torch.cuda.is_available()  # the CPU backend (gloo) only checks that the script runs
    device = init_rank(rank, world, port, cuda)
    group = dist.new_group(list(range(world)))
    n, hidden, num_experts = args.tokens, args.hidden, args.experts
    lpr = num_experts // world
    x = torch.randn((n, hidden), generator=torch.Generator().manual_seed(rank)).to(
        device, torch.bfloat16
    )
    routing_map, probs = (t.to(device) for t in _routing(n, num_experts, args.top_k, 100 + rank))
    hidden_out, _, _, _, handle = tfa.hybrid_ep_dispatch(x, routing_map, probs, group, lpr)
    static_rows = int(hidden_out.shape[0])
    ops = {
        "dispatch (dynamic P)": lambda: tfa.hybrid_ep_dispatch(x, routing_map, probs, group, lpr),
        "dispatch (static P)": lambda: tfa.hybrid_ep_dispatch(
            x, routing_map, probs, group, lpr, num_permuted_tokens=static_rows
        ),
        "combine": lambda: tfa.hybrid_ep_combine(hidden_out, handle),
    }
    result = {"world": world, "tokens": n, "hidden": hidden, "experts": num_experts}
    result["device"] = torch.cuda.get_device_name(device) if cuda else "cpu"
    result["commit"] = os.environ.get("FA2A_COMMIT", "unknown")
    for name, fn in ops.items():
        for _ in range(3):
            fn()
        result[name] = _kernel_times(fn) if cuda else []
        if args.timeline and cuda:
            result[f"timeline {name}"] = _timeline(fn)
    dist.barrier()
    if rank == 0:
        queue.put(result)
    dist.destroy_process_group()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--world", type=int, default=max(torch.cuda.device_count(), 2))
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--hidden", type=int, default=7168)
    parser.add_argument("--experts", type=int, default=256)
    parser.add_argument("--top-k", type=int, default=8)
    parser.add_argument("--out", default="hybrid_kernels.json")
    parser.add_argument("--timeline", action="store_true", help="also one call's events in order")
    args = parser.parse_args()
    result = spawn_ranks(_worker, args.world, args, timeout=300)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    for name, rows in result.items():
        if isinstance(rows, list):
            print(name)
            for row in rows:
                if name.startswith("timeline"):
                    print(f"  {row[0]:9.1f} {row[1]:8.1f} {row[2]} {row[3]}")
                else:
                    print(f"  {row[0][:60]:60s} x{row[1]:<5} {row[2]:9.1f} us")


if __name__ == "__main__":
    main()
