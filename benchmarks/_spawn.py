"""One process per rank for the benchmark scripts (bench_normal.py, host_profile.py): NVLink
multicast off (KINDS.md), a free local port for the process group, and rank 0's result back."""

from __future__ import annotations

import os
import socket

import torch.multiprocessing as mp


def spawn_ranks(worker, world: int, args, timeout: float):
    """Runs worker(rank, world, port, args, queue) in `world` spawned processes and returns what
    rank 0 puts on the queue (waiting at most `timeout` seconds)."""
    for var, val in (
        ("NCCL_NVLS_ENABLE", "0"),
        ("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1"),
        ("NVSHMEM_DISABLE_NVLS", "1"),
    ):
        os.environ[var] = val
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=worker, args=(r, world, port, args, queue)) for r in range(world)]
    for p in procs:
        p.start()
    result = queue.get(timeout=timeout)
    for p in procs:
        p.join(120)
    return result


def init_rank(rank: int, world: int, port: int, cuda: bool):
    """This rank's device and the default process group (NCCL on GPUs, gloo on CPUs)."""
    import torch
    import torch.distributed as dist

    device = torch.device("cuda", rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(rank)
    dist.init_process_group(
        "nccl" if cuda else "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world,
        **({"device_id": device} if cuda else {}),
    )
    return device
