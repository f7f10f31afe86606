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
    args = parser.parse_args()
    result = spawn_ranks(_worker, args.world, args, timeout=300)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    for name, rows in result.items():
        if isinstance(rows, list):
            print(name)
            for kernel, count, us in rows:
                print(f"  {kernel[:60]:60s} x{count:<5} {us:9.1f} us")


if __name__ == "__main__":
    main()
