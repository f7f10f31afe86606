"""Every op of both modes on one rank (group of 1), forward and backward, over a few shapes: the
workload that tools/gpu_sanitize.sh runs under compute-sanitizer (memcheck, racecheck,
synccheck). One rank, because the sanitizer serialises kernels and the multi-rank kernels wait
for their peers' kernels; the single-rank path runs the same kernels (count exchange, rounds,
chunk flags, bulk copies) with the rank as its own peer.

    python tools/sanitize_ops.py [--device cuda|cpu]     # prints "ok" and the op count
"""

from __future__ import annotations

import argparse
import os
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    args = parser.parse_args(argv)
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29531")
    os.environ.setdefault("FUSED_A2A_BUFFER_ROWS", "16")
    import torch
    import torch.distributed as dist

    import torch_fused_a2a as tfa

    dist.init_process_group("gloo", rank=0, world_size=1)
    device = torch.device(args.device, 0) if args.device == "cuda" else torch.device("cpu")
    group = dist.group.WORLD
    gen = torch.Generator().manual_seed(5)
    ops = 0
    # (tokens, hidden, experts, top-k, dtype): empty, uneven, several rounds (the buffers hold
    # FUSED_A2A_BUFFER_ROWS = 16 rows per peer unless set), fp32
    for n, h, e, k, dtype in (
        (0, 128, 8, 2, torch.bfloat16),
        (37, 256, 8, 3, torch.bfloat16),
        (300, 128, 16, 4, torch.bfloat16),
        (64, 64, 4, 1, torch.float32),
    ):
        x = torch.randn(n, h, generator=gen).to(dtype).to(device).requires_grad_(True)
        idx = torch.argsort(torch.rand(n, e, generator=gen), dim=1)[:, :k].contiguous()
        idx[torch.rand(n, k, generator=gen) < 0.2] = -1
        idx = idx.to(device)
        w = torch.rand(n, k, generator=gen).to(device).requires_grad_(True)
        rx, _, rw, _, handle = tfa.fused_dispatch(x, idx, w, e, group)
        out, _ = tfa.fused_combine(rx, group, handle)
        (out.float().sum() + rw.sum()).backward()
        ops += 4
        routing = torch.rand(n, e, generator=gen) < 0.4
        probs = torch.rand(n, e, generator=gen)
        xh = x.detach().clone().requires_grad_(True)
        ph = probs.to(device).requires_grad_(True)
        hidden, hprobs, _, _, hhandle = tfa.hybrid_ep_dispatch(
            xh, routing.to(device), ph, group, e, pad_multiple=16
        )
        combined = tfa.hybrid_ep_combine(hidden, hhandle)
        (combined.float().sum() + hprobs.sum()).backward()
        ops += 4
    if device.type == "cuda":
        torch.cuda.synchronize()
    dist.destroy_process_group()
    print(f"ok: {ops} ops", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
