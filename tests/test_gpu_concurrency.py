"""Issue 8 on GPUs: concurrency and op mismatch with the CUDA backend (the CPU counterparts are
tests/test_reliability_resources.py and tests/test_reliability_timeouts.py).

- Two EP groups over the same two GPUs (the world and a second group of the same ranks, so two
  buffers) used alternately: dispatch on both, combine in reverse order, normal and HybridEP;
  bitwise against tests/reference.py.
- torch and JAX in one process on the same GPUs: a one-rank torch group on GPU 0 and a JAX
  shard_map over GPUs 0 and 1, alternately; both bitwise against the reference.
- A rank that calls another op than its peer (dispatch vs combine on the same buffer): both raise
  a clear error within the timeout + 5 s, and a new group then computes exact results.
"""

from __future__ import annotations

import os
import time

import numpy as np
import pytest
import reference as R
from conftest import gpu_count
from mp import run_ranks
from reference import assert_bitwise_equal
from test_reliability_resources import (
    _two_group_inputs,
    assert_group_results,
    jax_round_trip,
    two_group_reference,
)

pytestmark = pytest.mark.gpu
TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
REPO_ROOT = os.path.dirname(TESTS_DIR)
GPU_ENV = {"NCCL_NVLS_ENABLE": "0", "PYTHONFAULTHANDLER": "1", "FUSED_A2A_TIMEOUT_S": "30"}
SEEDS = {"world": 2, "second": 3}


def _need2():
    if gpu_count() < 2:
        pytest.skip(f"needs 2 CUDA GPUs, {gpu_count()} visible")


def _rank_two_groups(rank, world, iterations):
    import torch
    import torch.distributed as dist
    from torch_utils import from_numpy, to_numpy

    import torch_fused_a2a as tfa

    torch.cuda.set_device(rank)
    dev = torch.device("cuda", rank)
    groups = {"world": dist.group.WORLD, "second": dist.new_group([0, 1])}
    out = []
    for it in range(iterations):
        pending, step = [], {}
        for name, group in groups.items():
            inp, e, lpr = _two_group_inputs([0, 1], 10 * it + SEEDS[name])
            mine = {k: from_numpy(v).to(dev) for k, v in inp[rank].items()}
            x, idx, w = mine["x"], mine["idx"], mine["w"]
            recv_x, _, _, _, handle = tfa.fused_dispatch(x, idx, w, e, group)
            hidden, _, _, _, hhandle = tfa.hybrid_ep_dispatch(
                mine["x"], mine["rmap"], mine["probs"], group, lpr
            )
            pending.append((name, group, recv_x, handle, hidden, hhandle))
        for name, group, recv_x, handle, hidden, hhandle in reversed(pending):
            out_x, _ = tfa.fused_combine(recv_x, group, handle)
            hout = tfa.hybrid_ep_combine(hidden, hhandle)
            got = dict(recv_x=recv_x, out=out_x, hidden=hidden, hout=hout)
            step[name] = {k: to_numpy(v) for k, v in got.items()}
        out.append(step)
    return out


def test_gpu_two_groups_used_alternately():
    _need2()
    iterations = 3
    res = run_ranks(_rank_two_groups, 2, iterations, timeout=240, env=GPU_ENV)
    for it in range(iterations):
        for name in SEEDS:
            got = [res[r][it][name] for r in range(2)]
            assert_group_results(got, [0, 1], 10 * it + SEEDS[name], f"iteration {it} group {name}")


def _rank_torch_and_jax(rank, world):
    import torch
    import torch.distributed as dist
    from torch_utils import from_numpy, to_numpy

    import torch_fused_a2a as tfa

    torch.cuda.set_device(0)
    import jax

    devices = jax.devices()[:2]
    assert all(d.platform == "gpu" for d in devices) and len(devices) == 2, devices
    _, e, _ = _two_group_inputs([0, 1], 7)
    jax_step = jax_round_trip(devices, e)
    results = []
    for it in range(3):
        tinp, te, _ = _two_group_inputs([0], 10 * it + 5)  # torch: a one-rank group on GPU 0
        mine = {k: from_numpy(v).cuda() for k, v in tinp[0].items()}
        recv_x, _, _, _, handle = tfa.fused_dispatch(
            mine["x"], mine["idx"], mine["w"], te, dist.group.WORLD
        )
        out, _ = tfa.fused_combine(recv_x, dist.group.WORLD, handle)
        inp, _, _ = _two_group_inputs([0, 1], 10 * it + 7)  # JAX: GPUs 0 and 1
        jrecv, jout = jax_step(inp)
        results.append(dict(recv_x=to_numpy(recv_x), out=to_numpy(out), jrecv=jrecv, jout=jout))
    return results


def test_gpu_torch_and_jax_in_one_process():
    _need2()
    env = dict(
        GPU_ENV,
        JAX_PLATFORMS="cuda",
        XLA_PYTHON_CLIENT_PREALLOCATE="false",
        PYTHONPATH=os.pathsep.join(p for p in (os.environ.get("PYTHONPATH", ""), REPO_ROOT) if p),
    )
    res = run_ranks(_rank_torch_and_jax, 1, timeout=300, env=env)[0]
    for it, got in enumerate(res):
        tdisp, touts, _, _ = two_group_reference([0], 10 * it + 5)
        assert_bitwise_equal(got["recv_x"], tdisp[0]["recv_x"], f"iteration {it} torch recv_x")
        assert_bitwise_equal(got["out"], touts[0], f"iteration {it} torch combine")
        disp, outs, _, _ = two_group_reference([0, 1], 10 * it + 7)
        for r in range(2):
            m = disp[r]["recv_x"].shape[0]
            rows = got["jrecv"].reshape(2, -1, got["jrecv"].shape[-1])[r]
            assert_bitwise_equal(rows[:m], disp[r]["recv_x"], f"iteration {it} JAX rank {r}")
            jout = got["jout"].reshape(2, -1, got["jout"].shape[-1])[r]
            assert_bitwise_equal(jout, outs[r], f"iteration {it} JAX combine rank {r}")


def _rank_mismatch(rank, world):
    import torch
    import torch.distributed as dist

    import torch_fused_a2a as tfa

    torch.cuda.set_device(rank)
    dev = torch.device("cuda", rank)
    inp, e, _ = _two_group_inputs([0, 1], 9)
    x = torch.tensor(inp[rank]["x"].view(np.int16)).view(torch.bfloat16).to(dev)
    idx = torch.tensor(inp[rank]["idx"]).to(dev)
    w = torch.tensor(inp[rank]["w"]).to(dev)
    group = dist.group.WORLD
    recv_x, _, _, _, handle = tfa.fused_dispatch(x, idx, w, e, group)
    torch.cuda.synchronize()
    dist.barrier()
    os.environ["FUSED_A2A_TIMEOUT_S"] = "3"
    start, failure = time.monotonic(), None
    for _ in range(3):  # an asynchronous op's error is raised by the next call at the latest
        try:
            if rank == 0:
                tfa.fused_dispatch(x, idx, w, e, group)
            else:
                tfa.fused_combine(recv_x, group, handle)
            torch.cuda.synchronize()
        except Exception as exc:  # noqa: BLE001
            failure = (type(exc).__name__, str(exc), time.monotonic() - start)
            break
    # A new group (fresh buffer): exact again.
    os.environ["FUSED_A2A_TIMEOUT_S"] = "30"
    group2 = dist.new_group([0, 1])
    recv_x, _, _, _, handle = tfa.fused_dispatch(x, idx, w, e, group2)
    out, _ = tfa.fused_combine(recv_x, group2, handle)
    return failure, out.float().cpu().numpy()


def test_gpu_op_mismatch_raises_then_new_group_works():
    _need2()
    res = run_ranks(_rank_mismatch, 2, timeout=180, env=GPU_ENV)
    inp, e, _ = _two_group_inputs([0, 1], 9)
    disp = R.dispatch([i["x"] for i in inp], [i["idx"] for i in inp], [i["w"] for i in inp], e)
    outs, _ = R.combine([d["recv_x"] for d in disp], disp, [6, 6])
    for rank, op in ((0, "dispatch"), (1, "combine")):
        failure, out = res[rank]
        assert failure is not None, f"rank {rank}: the mismatched {op} did not raise"
        name, text, took = failure
        print(f"rank {rank} ({op}): {name} after {took:.1f} s: {text}")
        assert name == "TimeoutError" and f"fused_a2a: {op}" in text, failure
        assert ("mismatch" in text or "timed out" in text) and took < 3 + 5, failure
        np.testing.assert_array_equal(out, outs[rank].astype(np.float32), f"rank {rank} after")
