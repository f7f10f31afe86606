"""The count exchange's host counts on CUDA GPUs (`DispatchArgs::host_counts`, what the torch
dynamic dispatch reads after its one wait): pinned host memory, which the notify kernel writes
through UVA, and pageable memory, which goes through device scratch and one copy after the sync.
Both must give [num_recv, 0, group_max_tokens, tokens_per_expert...] as counted here from the
routing, with and without a host ticket (`DispatchArgs::host_ticket`: with pinned memory the
notify returns at once and `dispatch_notify_wait` waits for the ticket, written last; pageable
memory falls back to the sync). Then the torch dynamic dispatch's paths (exact, speculative,
redo) on GPUs against the reference. Skipped unless at least two CUDA GPUs are visible."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import gpu_count
from mp import run_ranks
from test_gpu_normal import GPU_ENV, _need

pytestmark = pytest.mark.gpu


def _rank_host_counts(rank, world):
    """dispatch_notify's host counts through the raw core: pinned memory (the kernel writes it)
    and pageable memory (written into device scratch, copied after the sync). Each notify is
    followed by its data phase."""
    import torch
    import torch.distributed as dist

    import fused_a2a_core as core
    import torch_fused_a2a as tfa
    from fused_a2a._common import DTYPE_BF16, DTYPE_I64

    torch.cuda.set_device(rank)
    n, h, k, e = _host_counts_tokens(rank), 256, 4, 8 * world
    x, idx = (t.cuda() for t in _host_counts_inputs(rank, world))
    buf = tfa.get_buffer(dist.group.WORLD, tfa.get_hidden_bytes(x), x.device)
    lpr = e // world
    stream = torch.cuda.current_stream().cuda_stream
    out = {}
    variants = (("pinned", True, 0), ("pageable", False, 0))
    variants += (("pinned_ticket", True, 9), ("pageable_ticket", False, 11))
    for name, pinned, ticket in variants:
        counts = torch.zeros(world, dtype=torch.int32, device="cuda")
        per_expert = torch.zeros(lpr, dtype=torch.int32, device="cuda")
        stats = torch.zeros(3, dtype=torch.int32, device="cuda")
        host = torch.full((4 + lpr,), -7, dtype=torch.int32, pin_memory=pinned)
        args = core.DispatchArgs()
        args.x, args.x_dtype, args.num_tokens, args.hidden = x.data_ptr(), DTYPE_BF16, n, h
        args.topk_idx, args.idx_dtype, args.num_topk = idx.data_ptr(), DTYPE_I64, k
        args.num_experts = e
        args.recv_src_counts, args.tokens_per_expert = counts.data_ptr(), per_expert.data_ptr()
        args.num_recv, args.num_dropped = stats.data_ptr(), stats.data_ptr() + 4
        args.group_max_tokens = stats.data_ptr() + 8
        args.host_counts, args.host_ticket = host.data_ptr(), ticket
        core.dispatch_notify(buf.group_id, buf.rank, stream, args)
        if ticket:
            core.dispatch_notify_wait(buf.group_id, buf.rank, host.data_ptr(), lpr, ticket)
        num_recv = int(host[0])
        recv_x = torch.empty((max(num_recv, 1), h), dtype=x.dtype, device="cuda")
        src_token = torch.empty(max(num_recv, 1), dtype=torch.int32, device="cuda")
        args.capacity, args.recv_x = num_recv, recv_x.data_ptr()
        args.recv_src_token = src_token.data_ptr()
        core.dispatch_data(buf.group_id, buf.rank, stream, args)
        torch.cuda.synchronize()
        out[name] = dict(
            host=host.numpy().copy(),
            counts=counts.cpu().numpy(),
            per_expert=per_expert.cpu().numpy(),
            stats=stats.cpu().numpy(),
        )
    return out


def _host_counts_tokens(rank: int) -> int:  # N of each rank (unequal, so group_max means something)
    return 37 + 11 * rank


def _host_counts_inputs(rank: int, world: int):
    """(x [N, 256] bf16, topk_idx [N, 4] int64 of 8 * world experts, distinct per token) on the
    CPU, the same in the rank and in the parent's check."""
    import torch

    gen = torch.Generator().manual_seed(40 + rank)
    n, e = _host_counts_tokens(rank), 8 * world
    x = torch.randn(n, 256, generator=gen).to(torch.bfloat16)
    return x, torch.argsort(torch.rand(n, e, generator=gen), 1)[:, :4].contiguous()


def test_host_counts_pinned_and_pageable_agree():
    """The count exchange's host counts [num_recv, 0, group_max, tokens_per_expert...] are the
    same whether the kernel writes pinned memory or they go through device scratch (pageable
    memory), and they match the device outputs and the routing counted here."""
    g = min(4, gpu_count())
    _need(2)
    res = run_ranks(_rank_host_counts, g, timeout=300, env=GPU_ENV)
    idxs = [_host_counts_inputs(s, g)[1].numpy() for s in range(g)]
    lpr = 8  # 8 * g experts
    group_max = max(_host_counts_tokens(s) for s in range(g))
    for r, out in enumerate(res):
        owners = [idx // lpr == r for idx in idxs]
        want_counts = np.array([int(o.any(1).sum()) for o in owners], np.int32)
        want_experts = np.array(
            [sum(int((idx == r * lpr + j).sum()) for idx in idxs) for j in range(lpr)], np.int32
        )
        want_host = np.concatenate([[want_counts.sum(), 0, group_max], want_experts])
        for name, ticket in (
            ("pinned", -7),
            ("pageable", -7),
            ("pinned_ticket", 9),
            ("pageable_ticket", 11),
        ):
            got = out[name]
            assert got["host"][-1] == ticket, (r, name, got["host"])
            got["host"] = got["host"][:-1]
            assert (got["counts"] == want_counts).all(), (r, name, got, want_counts)
            assert (got["per_expert"] == want_experts).all(), (r, name, got, want_experts)
            assert (got["host"] == want_host).all(), (r, name, got["host"], want_host)
            assert got["stats"][0] == want_counts.sum() and got["stats"][2] == group_max


@pytest.mark.parametrize(
    "layout", ["default", "dynamic", "two_kernels", "default-pause", "default-sleep"]
)
def test_dynamic_dispatch_speculative_paths_gpu(layout):
    """tests/test_torch_normal.py's speculative-path steps on GPUs: outputs shrunk to num_recv
    rows, a redo when the group's largest N grew; bitwise against the reference. "default": the
    speculative calls run the static kernel, which writes the host counts and the ticket once
    the counts are exchanged. "two_kernels": the data kernel queued behind the count exchange
    (FUSED_A2A_TORCH_SPECULATIVE=two_kernels). "dynamic": that, with the exchange publishing
    every rank's layout (with the speculative capacity, or none on the exact path), so the data
    kernel sends no ready message (FUSED_A2A_CUDA_LAYOUT=dynamic). "-pause" / "-sleep": the
    host's wait for the ticket with FUSED_A2A_HOST_WAIT=pause / sleep."""
    import test_torch_normal as tn

    _need(3)
    env = {**GPU_ENV, "FA2A_TEST_DEVICE": "cuda"}
    layout, _, host_wait = layout.partition("-")
    if host_wait:
        env["FUSED_A2A_HOST_WAIT"] = host_wait
    if layout != "default":
        env["FUSED_A2A_TORCH_SPECULATIVE"] = "two_kernels"
    if layout == "dynamic":
        env["FUSED_A2A_CUDA_LAYOUT"] = "dynamic"
    res = run_ranks(tn._rank_speculative, 3, timeout=300, env=env)
    tn.check_speculative_steps(res, one_kernel=layout == "default")


def _rank_capture(rank, world):
    """A dynamic dispatch inside CUDA graph capture fails at once (its counts must reach the
    host, which a captured kernel never does), and the group works afterwards."""
    import time

    import torch
    import torch.distributed as dist

    import torch_fused_a2a as tfa

    torch.cuda.set_device(rank)
    group, e = dist.group.WORLD, 8 * world
    x, idx = (t.cuda() for t in _host_counts_inputs(rank, world))
    tfa.fused_dispatch(x, idx, None, e, group)  # the buffer, and the group's N seen
    torch.cuda.synchronize()
    graph, start = torch.cuda.CUDAGraph(), time.monotonic()
    try:
        with torch.cuda.graph(graph):
            tfa.fused_dispatch(x, idx, None, e, group)
        message = "no error"
    except Exception as exc:  # noqa: BLE001 - reported to the parent
        message = f"{type(exc).__name__}: {exc}"
    seconds = time.monotonic() - start
    recv_x = tfa.fused_dispatch(x, idx, None, e, group)[0]
    torch.cuda.synchronize()
    return dict(message=message, seconds=seconds, rows=int(recv_x.shape[0]))


@pytest.mark.parametrize("speculative", ["static", "two_kernels"])
def test_dynamic_dispatch_in_graph_capture_fails_fast(speculative):
    """The captured call is a speculative one: through the static kernel (the default) or
    dispatch_notify + the data kernel."""
    _need(2)
    env = {**GPU_ENV, "FUSED_A2A_TORCH_SPECULATIVE": speculative}
    res = run_ranks(_rank_capture, 2, timeout=300, env=env)
    idxs = [_host_counts_inputs(s, 2)[1].numpy() for s in range(2)]
    for r, got in enumerate(res):
        assert "captur" in got["message"].lower(), (r, got)  # ours, or CUDA's capture error
        assert got["seconds"] < 10, (r, got)
        want_rows = sum(int((idx // 8 == r).any(1).sum()) for idx in idxs)
        assert got["rows"] == want_rows, (r, got, want_rows)


def _rank_bad_host_wait(rank, world):
    """A FUSED_A2A_HOST_WAIT the wait would refuse fails the speculative dispatch before it
    launches anything (every rank, the same value), and the group works afterwards."""
    import os

    import torch
    import torch.distributed as dist

    import torch_fused_a2a as tfa

    torch.cuda.set_device(rank)
    group, e = dist.group.WORLD, 8 * world
    x, idx = (t.cuda() for t in _host_counts_inputs(rank, world))
    tfa.fused_dispatch(x, idx, None, e, group)  # exact: the group's N seen, no ticket
    os.environ["FUSED_A2A_HOST_WAIT"] = "bogus"
    try:
        tfa.fused_dispatch(x, idx, None, e, group)  # speculative: the ticket's wait
        message = "no error"
    except Exception as exc:  # noqa: BLE001 - reported to the parent
        message = f"{type(exc).__name__}: {exc}"
    del os.environ["FUSED_A2A_HOST_WAIT"]
    rows = tfa.fused_dispatch(x, idx, None, e, group)[0].shape[0]
    torch.cuda.synchronize()
    return dict(message=message, rows=int(rows))


def test_bad_host_wait_fails_before_launch():
    _need(2)
    res = run_ranks(_rank_bad_host_wait, 2, timeout=300, env=GPU_ENV)
    for r, got in enumerate(res):
        assert "FUSED_A2A_HOST_WAIT" in got["message"] and "bogus" in got["message"], (r, got)
        assert got["message"].startswith("ValueError"), (r, got)
        assert got["rows"] > 0, (r, got)
