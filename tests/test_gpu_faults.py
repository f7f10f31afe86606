"""Fault injection on GPUs (issue 8): a rank process dies in the middle of a CUDA dispatch, in the
middle of a CUDA combine, between the two, and in the middle of a CUDA HybridEP dispatch (plain and
overlapped rounds, and with the host spinning on the count exchange's ticket). Every survivor must
raise fused_a2a's TimeoutError (naming the op, its rank and the dead rank) within
FUSED_A2A_TIMEOUT_S + 5 s of the death, without hanging or crashing its CUDA context, and must then
compute exact results (against tests/reference.py) with fresh buffers in a new group of the
survivors (a new group of one rank on a 2-GPU machine).

"Mid-op" on a GPU: the ops run on 2 SMs (data phases of milliseconds at these sizes); the warm-up
times the scenario's op from a common start (a barrier), and the victim is SIGKILLed a quarter of
the way into the next one. Depending on how far the victim's kernels got, a survivor fails in that
op (its data phase) or, when it had already received everything it needed from the victim, at the
start of its next call; either way within the bound. The test prints which.
The CPU counterpart (rows watched from the host) is tests/test_reliability_faults.py.
"""

from __future__ import annotations

import os
import re
import threading
import time

import pytest
from conftest import gpu_count
from mp import RankError, run_ranks
from test_reliability_faults import _die, _recover, check_recovered

pytestmark = pytest.mark.gpu
TIMEOUT_S = 2.0
N, H, K, L = 8192, 7168, 8, 8  # per rank; the standard case's rows, top-8 of 8 experts per rank
GPU_ENV = {"NCCL_NVLS_ENABLE": "0", "PYTHONFAULTHANDLER": "1", "FUSED_A2A_TIMEOUT_S": "60"}


def _rank_fault(rank, world, scenario, victim, tmp):
    import torch
    import torch.distributed as dist

    import torch_fused_a2a as tfa

    torch.cuda.set_device(rank)
    dev = torch.device("cuda", rank)
    group = dist.group.WORLD
    e = world * L
    gen = torch.Generator(device=dev).manual_seed(5 + rank)
    x = torch.randn(N, H, device=dev, generator=gen).to(torch.bfloat16)
    idx = torch.argsort(torch.rand(N, e, device=dev, generator=gen), dim=1)[:, :K].contiguous()
    w = torch.rand(N, K, device=dev, generator=gen)
    rmap = torch.rand(N, e, device=dev, generator=gen) < 0.3
    probs = torch.rand(N, e, device=dev, generator=gen)
    stamp = os.path.join(tmp, "victim_died_at")
    tfa.set_deepep_num_sms(2)  # long data phases, so a kill lands inside one

    def dispatch():
        return tfa.fused_dispatch(x, idx, w, e, group)

    def hybrid_dispatch():
        return tfa.hybrid_ep_dispatch(x, rmap, probs, group, L, 2, 2)

    recv_x, _, _, _, handle = dispatch()
    steps = {
        "mid-dispatch": dispatch,
        "mid-combine": lambda: tfa.fused_combine(recv_x, group, handle),
        "between": lambda: tfa.fused_combine(recv_x, group, handle),
        "mid-hybrid-dispatch": hybrid_dispatch,
        "mid-hybrid-dispatch-overlap": hybrid_dispatch,
        "mid-hybrid-dispatch-spin": hybrid_dispatch,
    }
    # Warm up, and time the scenario's op from a common start (a barrier): the victim dies half
    # way through the next one.
    for _ in range(3):
        torch.cuda.synchronize()
        dist.barrier()
        t0 = time.monotonic()
        steps[scenario]()
        torch.cuda.synchronize()
        op_s = time.monotonic() - t0
    torch.cuda.synchronize()
    os.environ["FUSED_A2A_TIMEOUT_S"] = str(TIMEOUT_S)  # read by every op call from now on
    if scenario == "between":
        dispatch()
        torch.cuda.synchronize()
        if rank == victim:
            _die(stamp, how="exit")
        time.sleep(0.5)  # the victim is gone before the survivors combine
    else:
        dist.barrier()
        if rank == victim:
            threading.Timer(op_s / 4, _die, (stamp, "kill")).start()
            steps[scenario]()
            torch.cuda.synchronize()
            time.sleep(60)  # killed before this ends
    failure, calls, deadline = None, 0, time.monotonic() + 60
    while failure is None and time.monotonic() < deadline:
        try:
            calls += 1
            steps[scenario]()
            torch.cuda.synchronize()  # a kernel's timeout is raised by the next call at the latest
        except Exception as exc:  # noqa: BLE001
            mro = [c.__name__ for c in type(exc).__mro__]
            failure = dict(at=time.time(), mro=mro, message=str(exc), calls=calls, op_s=op_s)
    assert failure is not None, "the survivors' ops kept succeeding after the victim died"

    tfa.set_deepep_num_sms(24)
    return dict(failure=failure, after=_recover(rank, world, victim, tmp, dev))


SCENARIOS = {
    # name: (victim, op named in the survivors' errors)
    "mid-dispatch": (1, "dispatch"),
    "mid-combine": (1, "combine"),
    "between": (0, "combine"),
    "mid-hybrid-dispatch": (1, "hybrid dispatch"),
    # the overlapped rounds (the default at G >= 4 since session 15; the test runs 3 ranks):
    # receiving blocks also wait for their own rank's ack, the error must still name the victim
    "mid-hybrid-dispatch-overlap": (1, "hybrid dispatch"),
    # the host spinning on the notify's ticket instead of a stream sync (session 16)
    "mid-hybrid-dispatch-spin": (1, "hybrid dispatch"),
}
SCENARIO_ENV = {
    "mid-hybrid-dispatch-overlap": {"FUSED_A2A_HYBRID_OVERLAP": "3"},
    "mid-hybrid-dispatch-spin": {"FUSED_A2A_HYBRID_NOTIFY_WAIT": "spin"},
}


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_gpu_rank_dies(scenario, tmp_path):
    if gpu_count() < 2:
        pytest.skip(f"needs 2 CUDA GPUs, {gpu_count()} visible")
    world = min(3, gpu_count())
    victim, op = SCENARIOS[scenario]
    res = run_ranks(
        _rank_fault,
        world,
        scenario,
        victim,
        str(tmp_path),
        timeout=240,
        env=dict(GPU_ENV, **SCENARIO_ENV.get(scenario, {})),
        expect_errors=True,
    )
    assert isinstance(res[victim], RankError) and res[victim].type_name == "ProcessDied", res[
        victim
    ]
    died_at = float((tmp_path / "victim_died_at").read_text())
    survivors = [r for r in range(world) if r != victim]
    for r in survivors:
        assert not isinstance(res[r], RankError), f"survivor {r}: {res[r].full()}"
        f = res[r]["failure"]
        text = f["message"]
        print(
            f"{scenario}: survivor {r} raised {f['at'] - died_at:.2f} s after the death (op "
            f"{f['op_s'] * 1e3:.1f} ms, call {f['calls']}): {text}"
        )
        assert "TimeoutError" in f["mro"] and "RuntimeError" in f["mro"], f
        assert re.search(rf"fused_a2a:? {op}", text), text
        assert re.search(rf"on rank {r}\b", text), text
        missing = re.search(r"rank\(s\) \[([0-9, ]+)\] did not arrive", text)
        assert missing and str(victim) in missing.group(1).split(", "), text
        # The op in flight when the victim died (call 1), its timeout raised by call 2, or the
        # start of the next call (3).
        assert f["calls"] <= 3, (f["calls"], text)
        waited = f["at"] - died_at
        assert waited < TIMEOUT_S + 5, f"survivor {r} raised {waited:.1f} s after the death: {text}"

    check_recovered(res, survivors)  # the survivors' new group: exact results
