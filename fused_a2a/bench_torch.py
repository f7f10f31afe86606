"""The torch side of ``fused-a2a bench``: one process per rank (gloo on CPU, NCCL on GPUs)."""

from __future__ import annotations

import os
import statistics
import time

import numpy as np

from fused_a2a.routing import expected_identity_combine, expected_receive, make_inputs

DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


def _timer(device):
    import torch

    if device.type == "cuda":

        def run(fn, iters):
            start = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
            end = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
            for i in range(iters):
                start[i].record()
                fn()
                end[i].record()
            torch.cuda.synchronize()
            return [s.elapsed_time(e) * 1e3 for s, e in zip(start, end, strict=True)]

        return run

    def run(fn, iters):
        times = []
        for _ in range(iters):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e6)
        return times

    return run


def rank_main(rank: int, world: int, port: int, case: dict, queue) -> None:
    """Runs one case on one rank and puts (rank, result dict) on the queue."""
    import torch
    import torch.distributed as dist

    try:
        use_cuda = case["device"] == "cuda"
        if use_cuda:
            torch.cuda.set_device(rank)
        dist.init_process_group(
            "nccl" if use_cuda else "gloo",
            init_method=f"tcp://127.0.0.1:{port}",
            rank=rank,
            world_size=world,
        )
        queue.put((rank, _run_case(rank, world, case)))
        dist.barrier()
        dist.destroy_process_group()
    except BaseException as error:  # reported to the parent, which prints it
        queue.put((rank, {"error": f"{type(error).__name__}: {error}"}))


def _run_case(rank: int, world: int, case: dict) -> dict:
    import torch
    import torch.distributed as dist

    from torch_fused_a2a import fused_combine, fused_dispatch

    device = torch.device("cuda", rank) if case["device"] == "cuda" else torch.device("cpu")
    dtype = getattr(torch, DTYPES[case["dtype"]])
    n, h, k, e = case["tokens"], case["hidden"], case["topk"], case["experts"]
    inputs = [make_inputs(r, n, h, k, e, case["seed"]) for r in range(world)]
    x_np, idx_np, w_np = inputs[rank]
    x = torch.from_numpy(x_np).to(dtype).to(device)
    idx = torch.from_numpy(idx_np).to(device)
    w = torch.from_numpy(w_np).to(device)
    group = dist.group.WORLD

    state = {}

    def do_dispatch():
        state["d"] = fused_dispatch(x, idx, w, e, group)

    def do_combine():
        state["c"] = fused_combine(state["d"][0], group, state["d"][4])

    timer = _timer(device)
    do_dispatch()
    do_combine()
    # Check: received rows and order, and combine of the identity expert.
    rounded = [torch.from_numpy(xs).to(dtype).float().numpy() for xs, _, _ in inputs]
    rounded_inputs = [(rounded[r], inputs[r][1], inputs[r][2]) for r in range(world)]
    want_rows, _ = expected_receive(rank, world, rounded_inputs, e)
    got_rows = state["d"][0].float().cpu().numpy()
    acc = expected_identity_combine(rank, world, rounded[rank], idx_np, e)
    want_out = torch.from_numpy(acc).to(dtype).float().numpy()
    got_out = state["c"][0].float().cpu().numpy()
    verified = bool(
        got_rows.shape == want_rows.shape
        and np.array_equal(got_rows.view(np.uint32), want_rows.view(np.uint32))
        and np.array_equal(got_out.view(np.uint32), want_out.view(np.uint32))
    )
    for _ in range(case["warmup"]):
        do_dispatch()
        do_combine()
    dist.barrier()
    dispatch_us = timer(do_dispatch, case["iters"])
    dist.barrier()
    combine_us = timer(do_combine, case["iters"])
    recv_rows = got_rows.shape[0]
    own_rows = int(((idx_np >= 0) & (idx_np // (e // world) == rank)).any(axis=1).sum())
    return {
        "verified": verified,
        "dispatch_us": statistics.median(dispatch_us),
        "combine_us": statistics.median(combine_us),
        "recv_bytes": recv_rows * h * x.element_size(),
        "remote_bytes": (recv_rows - own_rows) * h * x.element_size(),
        "pid": os.getpid(),
    }
