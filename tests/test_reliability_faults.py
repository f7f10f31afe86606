"""Fault injection on real processes (issue 8, CPU): a rank dies (SIGKILL or os._exit) in the middle
of a dispatch, in the middle of a combine, between the two, and in the middle of a HybridEP
dispatch. Every survivor must raise (fused_a2a_core.TimeoutError naming the op, the phase and the
dead rank) within FUSED_A2A_TIMEOUT_S + 5 s of the death, must not hang or crash, and must then
work correctly (bit for bit against tests/reference.py) in a fresh process group of the survivors.

The ops are long (FUSED_A2A_BUFFER_ROWS=1: a few rows per round, ~1000 rounds) and run in a loop.
The victim runs the same ops on the same buffers through raw core calls (tests/raw_core.py), so it
can watch its own output rows being written: a thread kills the process once between 1/4 and 3/4
of them are, i.e. in the middle of the op's data phase (the survivors' errors report the round
they were in, and the test checks it is past the first). When rank 0 dies, the process group's TCP
store dies with it: the survivors bootstrap the new group through a file store. One spawn of 3
ranks per scenario; ~40 s on 2 cores.
"""

from __future__ import annotations

import os
import re
import signal
import threading
import time

import numpy as np
import pytest
import raw_core as rc
import reference as R
from mp import RankError, run_ranks
from reference import assert_bitwise_equal

TIMEOUT_S = 2.0
WORLD = 3
BIG_N, H, K, L = 3000, 16, 2, 2  # per rank; H * 2 bytes = 32-byte rows
SMALL_N = 7


def _inputs(rank, world, n, seed):
    rng = np.random.default_rng([seed, rank])
    e = world * L
    x = rng.standard_normal((n, H), dtype=np.float32).astype(R.BF16)
    idx = np.argsort(rng.random((n, e)), axis=1)[:, :K].astype(np.int64)
    w = rng.random((n, K), dtype=np.float32)
    rmap = rng.random((n, e)) < 0.5
    probs = rng.random((n, e), dtype=np.float32)
    return dict(x=x, idx=idx, w=w, rmap=rmap, probs=probs)


def _die(stamp_path: str, how: str = "kill") -> None:
    with open(stamp_path, "w") as f:
        f.write(repr(time.time()))
    if how == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    os._exit(3)


def _die_mid_op(stamp_path: str):
    """A watch() for tests/raw_core.py: marks the op's output rows as unwritten, then kills this
    process from a thread once between 1/4 and 3/4 of the rows are written, i.e. while the op
    is moving rows with many rounds still to go (if a poll misses that window, the next op of
    the loop gets another watcher)."""

    def watch(out):
        bits = out.view(np.uint16).reshape(out.shape[0], -1)
        bits.fill(0xFFFF)  # a NaN pattern no row of the test takes
        total = out.shape[0]

        def poll():
            while True:
                written = int((bits != 0xFFFF).any(axis=1).sum())
                if total // 4 <= written <= 3 * total // 4:
                    _die(stamp_path)
                if written > 3 * total // 4:
                    return
                time.sleep(0)

        threading.Thread(target=poll, daemon=True).start()

    return watch


def _rank_fault(rank, world, scenario, victim, tmp):
    import torch
    import torch.distributed as dist
    from torch_utils import from_numpy, to_numpy

    import torch_fused_a2a as tfa

    torch.set_num_threads(1)
    group = dist.group.WORLD
    inp = {k: from_numpy(v) for k, v in _inputs(rank, world, BIG_N, 1).items()}
    e = world * L
    stamp = os.path.join(tmp, "victim_died_at")

    def dispatch():
        return tfa.FusedDispatch.apply(inp["x"], inp["idx"], inp["w"], e, group)

    def hybrid_dispatch():
        return tfa.hybrid_ep_dispatch(inp["x"], inp["rmap"], inp["probs"], group, L)

    # Warm up every op on every rank (first calls are slow), then start together.
    recv_x, _, _, _, handle = dispatch()
    tfa.FusedCombine.apply(recv_x, group, handle)
    hidden, _, _, _, hhandle = hybrid_dispatch()
    tfa.hybrid_ep_combine(hidden, hhandle)
    dist.barrier()
    os.environ["FUSED_A2A_TIMEOUT_S"] = str(TIMEOUT_S)  # from now on (60 s while warming up)

    steps = {
        "mid-dispatch": lambda: dispatch(),
        "mid-combine": lambda: tfa.FusedCombine.apply(recv_x, group, handle),
        "mid-hybrid-dispatch": lambda: hybrid_dispatch(),
    }
    if rank == victim and scenario != "between":
        # The victim runs the same ops on the same buffers through raw core calls, which let it
        # watch its output rows being written and die in the middle of the op.
        watch = _die_mid_op(stamp)
        gid, hgid = (
            tfa.get_buffer(group, 32).group_id,
            tfa.hybrid_ep._hybrid_ep_buffer.buffer.group_id,
        )
        raw = _inputs(rank, world, BIG_N, 1)
        y = to_numpy(recv_x)
        raw_handle = dict(
            idx=raw["idx"],
            counts=to_numpy(handle.recv_src_counts),
            src_token=to_numpy(handle.recv_src_token),
            stats=to_numpy(handle.stats),
            num_experts=e,
            num_tokens=BIG_N,
        )
        steps = {
            "mid-dispatch": lambda: rc.dispatch(
                gid, rank, world, raw["x"], raw["idx"], raw["w"], e, watch=watch
            ),
            "mid-combine": lambda: rc.combine(gid, rank, y, raw_handle, watch=watch),
            "mid-hybrid-dispatch": lambda: rc.hybrid_dispatch(
                hgid, rank, world, raw["x"], raw["rmap"], raw["probs"], L, watch=watch
            ),
        }
    failure = None
    deadline = time.monotonic() + 60
    if scenario == "between":
        dispatch()
        if rank == victim:
            _die(stamp, how="exit")
        time.sleep(0.5)  # the victim is gone before the survivors combine
        steps["between"] = lambda: tfa.FusedCombine.apply(recv_x, group, handle)
    while failure is None and time.monotonic() < deadline:
        try:
            steps[scenario]()
        except Exception as exc:  # noqa: BLE001
            failure = dict(
                at=time.time(),
                mro=[c.__name__ for c in type(exc).__mro__],
                message=str(exc),
            )
    assert failure is not None, "the survivors' ops kept succeeding after the victim died"

    return dict(failure=failure, after=_recover(rank, world, victim, tmp))


def _recover(rank, world, victim, tmp, device=None):
    """After a death: a fresh process group of the survivors (the old one has a dead member; when
    rank 0 died its TCP store died with it, so a file store), fresh buffers (get_buffer and the
    HybridEP buffer follow the new group), and every op once on small inputs, as numpy."""
    import datetime

    import torch.distributed as dist
    from torch_utils import from_numpy, to_numpy

    import torch_fused_a2a as tfa

    survivors = [r for r in range(world) if r != victim]
    new_rank = survivors.index(rank)
    dist.destroy_process_group()
    dist.init_process_group(
        "gloo",
        init_method="file://" + os.path.join(tmp, "store"),
        rank=new_rank,
        world_size=len(survivors),
        timeout=datetime.timedelta(seconds=60),
    )
    os.environ["FUSED_A2A_TIMEOUT_S"] = "60"
    group, g = dist.group.WORLD, len(survivors)
    small = {k: from_numpy(v) for k, v in _inputs(new_rank, g, SMALL_N, 2).items()}
    if device is not None:
        small = {k: v.to(device) for k, v in small.items()}
    recv_x, _, _, _, handle = tfa.fused_dispatch(small["x"], small["idx"], small["w"], g * L, group)
    out, _ = tfa.fused_combine(recv_x, group, handle)
    hidden, _, _, _, hhandle = tfa.hybrid_ep_dispatch(
        small["x"], small["rmap"], small["probs"], group, L
    )
    hout = tfa.hybrid_ep_combine(hidden, hhandle)
    after = dict(recv_x=recv_x, out=out, hidden=hidden, hout=hout)
    return {k: to_numpy(v) for k, v in after.items()}


def check_recovered(res, survivors):
    """The survivors' results of _recover, bit for bit against the reference."""
    g = len(survivors)
    small = [_inputs(r, g, SMALL_N, 2) for r in range(g)]
    disp = R.dispatch(
        [s["x"] for s in small], [s["idx"] for s in small], [s["w"] for s in small], g * L
    )
    outs, _ = R.combine([d["recv_x"] for d in disp], disp, [SMALL_N] * g)
    hdisp = R.hybrid_dispatch(
        [s["x"] for s in small], [s["rmap"] for s in small], [s["probs"] for s in small], L
    )
    houts, _ = R.hybrid_combine([d["hidden"] for d in hdisp], hdisp)
    for new_rank, r in enumerate(survivors):
        after = res[r]["after"]
        assert_bitwise_equal(after["recv_x"], disp[new_rank]["recv_x"], f"survivor {r} recv_x")
        assert_bitwise_equal(after["out"], outs[new_rank], f"survivor {r} combine")
        assert_bitwise_equal(after["hidden"], hdisp[new_rank]["hidden"], f"survivor {r} hybrid")
        assert_bitwise_equal(after["hout"], houts[new_rank], f"survivor {r} hybrid combine")


SCENARIOS = {
    # name: (victim, op named in the survivors' errors)
    "mid-dispatch": (2, "dispatch"),
    "mid-combine": (1, "combine"),
    "between": (0, "combine"),
    "mid-hybrid-dispatch": (1, "hybrid dispatch"),
}


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_rank_dies(scenario, tmp_path):
    victim, op = SCENARIOS[scenario]
    env = {"FUSED_A2A_TIMEOUT_S": "60", "FUSED_A2A_BUFFER_ROWS": "1"}
    res = run_ranks(
        _rank_fault,
        WORLD,
        scenario,
        victim,
        str(tmp_path),
        timeout=180,
        env=env,
        expect_errors=True,
    )
    assert isinstance(res[victim], RankError) and res[victim].type_name == "ProcessDied", res[
        victim
    ]
    died_at = float((tmp_path / "victim_died_at").read_text())
    survivors = [r for r in range(WORLD) if r != victim]
    rounds = []
    for r in survivors:
        assert not isinstance(res[r], RankError), f"survivor {r}: {res[r].full()}"
        f = res[r]["failure"]
        text = f["message"]
        assert "TimeoutError" in f["mro"] and "RuntimeError" in f["mro"], f
        assert f"fused_a2a {op}" in text, text
        assert re.search(rf"on rank {r} of {WORLD}\b", text), text
        missing = re.search(r"ranks \[([0-9, ]+)\] did not arrive", text)
        assert missing and str(victim) in missing.group(1).split(", "), text
        if scenario != "between":
            assert "phase 'data'" in text, text
        rounds.append(int(re.search(r"round (\d+) of this op", text).group(1)))
        waited = f["at"] - died_at
        assert waited < TIMEOUT_S + 5, f"survivor {r} raised {waited:.1f} s after the death: {text}"
    if scenario != "between":  # the death landed in the middle of the op, not before its start
        assert max(rounds) > 0, f"survivors failed in round(s) {rounds}"

    check_recovered(res, survivors)  # the survivors' new group: exact results
