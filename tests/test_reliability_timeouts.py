"""Bounded waits, op mismatches and errors shared by the group (issue 8, CPU).

- Every op and phase, with a peer that never arrives (alive, but it skipped the call or stopped
  after an earlier phase), raises fused_a2a_core.TimeoutError within FUSED_A2A_TIMEOUT_S + 5 s,
  naming the op, the phase, the round, this rank and the missing rank; the buffer is poisoned (the
  next op fails at once with the reason) and works again after a reset on every rank.
- A rank that calls a different op than its peers: a clear "op mismatch" error on both, at once
  (same buffer), or a timeout naming the peer (normal vs HybridEP: different buffers).
- HybridEP: an error that one rank finds in its own input during an op (a handle that does not
  fit) is reported to its peers through the round's status, so every rank raises at once (no
  timeout) and the buffer stays usable.

Two spawns of 2 and 3 gloo ranks; ~30 s on 2 cores (each timeout case waits 2 s).
"""

from __future__ import annotations

import os
import re
import sys
import time

import numpy as np
import pytest
import raw_core as rc
import reference as R
from mp import run_ranks
from reference import assert_bitwise_equal

import fused_a2a_core as core

TIMEOUT_S = 2.0
N, H, K, E, L = 6, 16, 2, 4, 2  # two ranks, two local experts each


def _normal_inputs(rank, num_ranks=2, seed=0):
    rng = np.random.default_rng([seed, rank])
    e = num_ranks * L
    x = rng.standard_normal((N, H), dtype=np.float32).astype(R.BF16)
    idx = np.argsort(rng.random((N, e)), axis=1)[:, :K].astype(np.int64)
    w = rng.random((N, K), dtype=np.float32)
    return x, idx, w


def _hybrid_inputs(rank, num_ranks=2, seed=0):
    rng = np.random.default_rng([seed, rank, 1])
    e = num_ranks * L
    x = rng.standard_normal((N, H), dtype=np.float32).astype(R.BF16)
    rmap = rng.random((N, e)) < 0.5
    probs = rng.random((N, e), dtype=np.float32)
    return x, rmap, probs


def _outcome(fn):
    start = time.monotonic()
    try:
        fn()
    except Exception as exc:  # noqa: BLE001
        mro = [c.__module__ + "." + c.__name__ for c in type(exc).__mro__]
        return dict(mro=mro, message=str(exc), elapsed=time.monotonic() - start)
    return dict(mro=None, message="no exception", elapsed=time.monotonic() - start)


# ----------------------------------------------------------------------------- rank side


class _Rank:
    """Torch state of one rank: inputs as tensors, helpers to run each op."""

    def __init__(self, rank, world):
        import torch
        import torch.distributed as dist
        from torch_utils import from_numpy

        import torch_fused_a2a as tfa

        torch.set_num_threads(1)
        self.torch, self.dist, self.tfa = torch, dist, tfa
        self.module = sys.modules["torch_fused_a2a.fused_a2a"]
        self.rank, self.world, self.group = rank, world, dist.group.WORLD
        self.e = world * L
        self.np_normal = _normal_inputs(rank, world)
        self.np_hybrid = _hybrid_inputs(rank, world)
        self.x, self.idx, self.w = (from_numpy(a) for a in self.np_normal)
        self.hx, self.rmap, self.probs = (from_numpy(a) for a in self.np_hybrid)

    def fresh_buffers(self):
        """Collective: drop both buffers and create them again (the reset after a failure)."""
        if self.module._buffer is not None:
            self.module._buffer.release()
        self.tfa.reset_hybrid_ep_buffer()
        self.tfa.get_buffer(self.group, self.tfa.get_hidden_bytes(self.x))
        self.tfa.init_hybrid_ep_buffer(self.group, H, N, L, 24, 24, False)

    def dispatch(self, grad=False):
        x, w = self.x.clone().requires_grad_(grad), self.w.clone().requires_grad_(grad)
        return self.tfa.FusedDispatch.apply(x, self.idx, w, self.e, self.group)

    def hybrid_dispatch(self, grad=False):
        x, p = self.hx.clone().requires_grad_(grad), self.probs.clone().requires_grad_(grad)
        return self.tfa.hybrid_ep_dispatch(x, self.rmap, p, self.group, L)

    def raw_notify(self):
        b = self.module._buffer
        rc.dispatch(b.group_id, b.rank, b.num_ranks, *self.np_normal, self.e, notify_only=True)

    def raw_hybrid_notify(self):
        b = self.tfa.hybrid_ep._hybrid_ep_buffer.buffer
        rc.hybrid_dispatch(b.group_id, b.rank, b.num_ranks, *self.np_hybrid, L, notify_only=True)


def _scenarios(s: _Rank):
    """name -> (what every rank does first, what rank 0 does, what rank 1 does instead)."""

    def combine_prep():
        recv_x, _, _, _, handle = s.dispatch()
        return (recv_x, handle)

    def combine_backward_prep():
        recv_x, _, _, _, handle = s.dispatch(grad=True)
        out, _ = s.tfa.FusedCombine.apply(recv_x * 1, s.group, handle)
        return (out,)

    def hybrid_combine_prep():
        hidden, _, _, _, handle = s.hybrid_dispatch()
        return (hidden, handle)

    def hybrid_backward_prep():
        hidden, _, _, _, handle = s.hybrid_dispatch(grad=True)
        return (s.tfa.hybrid_ep_combine(hidden * 1, handle),)

    nothing = lambda *a: None  # noqa: E731
    return {
        "dispatch/notify": (None, lambda: s.dispatch(), nothing),
        "dispatch/data": (None, lambda: s.dispatch(), lambda: s.raw_notify()),
        "combine/data": (
            combine_prep,
            lambda y, h: s.tfa.FusedCombine.apply(y, s.group, h),
            nothing,
        ),
        "combine backward (cached dispatch)/data": (
            combine_backward_prep,
            lambda out: out.float().sum().backward(),
            nothing,
        ),
        "hybrid dispatch/notify": (None, lambda: s.hybrid_dispatch(), nothing),
        "hybrid dispatch/data": (None, lambda: s.hybrid_dispatch(), lambda: s.raw_hybrid_notify()),
        "hybrid combine/data": (
            hybrid_combine_prep,
            lambda y, h: s.tfa.hybrid_ep_combine(y, h),
            nothing,
        ),
        "hybrid combine backward (cached dispatch)/data": (
            hybrid_backward_prep,
            lambda out: out.sum().backward(),
            nothing,
        ),
        # rank 1 calls another op on the same buffer: both see the other's message at once
        "mismatch dispatch vs combine": (
            combine_prep,
            lambda y, h: s.dispatch(),
            lambda y, h: s.tfa.FusedCombine.apply(y, s.group, h),
        ),
        # normal vs HybridEP: two buffers, so each waits for the other in vain
        "mismatch dispatch vs hybrid dispatch": (
            None,
            lambda: s.dispatch(),
            lambda: s.hybrid_dispatch(),
        ),
    }


def _rank_timeouts(rank, world):
    s = _Rank(rank, world)
    results = {}
    for name, (prep, on_rank0, on_rank1) in _scenarios(s).items():
        # The short timeout only for the call under test: a rank that is merely slow (first
        # call of an op, a loaded machine) must not fail the collective steps around it.
        os.environ["FUSED_A2A_TIMEOUT_S"] = "60"
        s.fresh_buffers()
        args = prep() if prep else ()
        action = on_rank0 if rank == 0 else on_rank1
        s.dist.barrier()
        os.environ["FUSED_A2A_TIMEOUT_S"] = str(TIMEOUT_S)
        results[name] = _outcome(lambda action=action, args=args: action(*args))
        if rank == 0 and name == "dispatch/notify":
            # poisoned: the next op on this buffer fails at once, naming the first failure
            results["poisoned"] = _outcome(lambda: s.raw_notify())
        s.dist.barrier()
    os.environ["FUSED_A2A_TIMEOUT_S"] = "60"
    # after the last reset, everything works again
    s.fresh_buffers()
    recv_x, _, _, _, handle = s.dispatch()
    out, _ = s.tfa.FusedCombine.apply(recv_x, s.group, handle)
    hidden, _, _, _, hhandle = s.hybrid_dispatch()
    hout = s.tfa.hybrid_ep_combine(hidden, hhandle)
    from torch_utils import to_numpy

    results["after"] = dict(
        recv_x=to_numpy(recv_x), out=to_numpy(out), hidden=to_numpy(hidden), hout=to_numpy(hout)
    )
    return results


_RUNS: dict = {}


def _timeout_results():
    if "timeouts" not in _RUNS:
        _RUNS["timeouts"] = run_ranks(_rank_timeouts, 2, timeout=240)
    return _RUNS["timeouts"]


TIMEOUT_CASES = {
    "dispatch/notify": ("dispatch", "notify"),
    "dispatch/data": ("dispatch", "data"),
    "combine/data": ("combine", "data"),
    "combine backward (cached dispatch)/data": ("dispatch", "data"),
    "hybrid dispatch/notify": ("hybrid dispatch", "notify"),
    "hybrid dispatch/data": ("hybrid dispatch", "data"),
    "hybrid combine/data": ("hybrid combine", "data"),
    "hybrid combine backward (cached dispatch)/data": ("hybrid dispatch (cached", "data"),
}


def _assert_timeout(res, op, phase, rank, missing):
    text = res["message"]
    assert res["mro"] is not None, f"no error: {res}"
    assert "fused_a2a_core.TimeoutError" in res["mro"], res
    assert "builtins.RuntimeError" in res["mro"], res  # TimeoutError is a RuntimeError
    assert f"fused_a2a {op}" in text, text
    assert f"phase '{phase}'" in text, text
    assert re.search(rf"on rank {rank}\b", text), text
    assert re.search(rf"ranks \[{missing}\] did not arrive", text), text
    assert "round 0 of this op" in text, text
    assert TIMEOUT_S - 0.1 < res["elapsed"] < TIMEOUT_S + 5, res


@pytest.mark.parametrize("name", list(TIMEOUT_CASES))
def test_missing_peer_times_out(name):
    op, phase = TIMEOUT_CASES[name]
    res = _timeout_results()
    _assert_timeout(res[0][name], op, phase, 0, 1)
    assert res[1][name]["mro"] is None, f"rank 1 (which skipped the call): {res[1][name]}"


def test_poisoned_buffer_fails_fast_with_the_reason():
    res = _timeout_results()[0]["poisoned"]
    assert res["mro"] is not None and "builtins.RuntimeError" in res["mro"], res
    assert "unusable after an earlier failure" in res["message"], res
    assert "timeout" in res["message"] and "phase 'notify'" in res["message"], res
    assert res["elapsed"] < 1.0, res


def test_op_mismatch_same_buffer():
    res = _timeout_results()
    for rank, other in ((0, "combine"), (1, "dispatch \\(notify\\)")):
        r = res[rank]["mismatch dispatch vs combine"]
        assert r["mro"] is not None and "builtins.RuntimeError" in r["mro"], r
        assert re.search(
            rf"op mismatch on rank {rank}: rank {1 - rank} called {other}", r["message"]
        ), r
        assert r["elapsed"] < 1.5, r


def test_op_mismatch_other_buffer_times_out():
    res = _timeout_results()
    _assert_timeout(res[0]["mismatch dispatch vs hybrid dispatch"], "dispatch", "notify", 0, 1)
    _assert_timeout(
        res[1]["mismatch dispatch vs hybrid dispatch"], "hybrid dispatch", "notify", 1, 0
    )


def test_works_after_reset():
    res = _timeout_results()
    xs, idxs, ws = zip(*[_normal_inputs(r) for r in range(2)], strict=True)
    disp = R.dispatch(list(xs), list(idxs), list(ws), 2 * L)
    outs, _ = R.combine([d["recv_x"] for d in disp], disp, [N, N])
    hxs, rmaps, probs = zip(*[_hybrid_inputs(r) for r in range(2)], strict=True)
    hdisp = R.hybrid_dispatch(list(hxs), list(rmaps), list(probs), L)
    houts, _ = R.hybrid_combine([d["hidden"] for d in hdisp], hdisp)
    for r in range(2):
        after = res[r]["after"]
        assert_bitwise_equal(after["recv_x"], disp[r]["recv_x"], f"rank {r} recv_x")
        assert_bitwise_equal(after["out"], outs[r], f"rank {r} combine")
        assert_bitwise_equal(after["hidden"], hdisp[r]["hidden"], f"rank {r} hybrid hidden")
        assert_bitwise_equal(after["hout"], houts[r], f"rank {r} hybrid combine")


# ----------------------------------------------------------------------------- HybridEP status


def _rank_hybrid_status(rank, world):
    s = _Rank(rank, world)
    s.fresh_buffers()
    results = {}
    bad = 1  # the rank whose handle does not fit

    def corrupt(handle, how):
        if rank != bad:
            return handle
        if how == "num_tokens":  # a handle of another N: rejected before the first round
            return handle._replace(num_tokens=N + 1)
        row_token = handle.row_token.clone()  # a row that is never sent back
        real = (row_token >= 0).nonzero().flatten()
        row_token[real[0]] = 10**6
        return handle._replace(row_token=row_token)

    for how in ("num_tokens", "row_token"):
        hidden, _, _, _, handle = s.hybrid_dispatch()
        h = corrupt(handle, how)
        results[f"combine/{how}"] = _outcome(lambda h=h, y=hidden: s.tfa.hybrid_ep_combine(y, h))
        s.dist.barrier()
    # combine backward = cached dispatch, with a handle of another N on one rank
    hidden, _, _, _, handle = s.hybrid_dispatch()
    gout = s.torch.ones((N + (rank == bad), H))
    h = corrupt(handle, "num_tokens")
    results["cached dispatch/num_tokens"] = _outcome(
        lambda: s.tfa.hybrid_ep._cached_dispatch(gout, h)
    )
    s.dist.barrier()
    # no reset: the buffer is still usable on every rank
    from torch_utils import to_numpy

    hidden, _, _, _, handle = s.hybrid_dispatch()
    results["after"] = dict(
        hidden=to_numpy(hidden), out=to_numpy(s.tfa.hybrid_ep_combine(hidden, handle))
    )
    return results


def test_hybrid_error_on_one_rank_fails_every_rank_at_once():
    res = run_ranks(_rank_hybrid_status, 3, timeout=180, env={"FUSED_A2A_TIMEOUT_S": "60"})
    for case in ("combine/num_tokens", "combine/row_token", "cached dispatch/num_tokens"):
        for rank in range(3):
            r = res[rank][case]
            assert r["mro"] is not None, f"{case}: rank {rank} raised nothing"
            assert r["elapsed"] < 5.0, f"{case}: rank {rank} took {r['elapsed']:.1f} s: {r}"
            if rank == 1:
                assert re.search(r"handle|N = |num_tokens", r["message"]), (case, r)
            else:
                assert "builtins.RuntimeError" in r["mro"], (case, r)
                assert "rank(s) [1]" in r["message"], (case, r)
                assert "TimeoutError" not in " ".join(r["mro"]), (case, r)
    hxs, rmaps, probs = zip(*[_hybrid_inputs(r, 3) for r in range(3)], strict=True)
    hdisp = R.hybrid_dispatch(list(hxs), list(rmaps), list(probs), L)
    houts, _ = R.hybrid_combine([d["hidden"] for d in hdisp], hdisp)
    for r in range(3):
        assert_bitwise_equal(res[r]["after"]["hidden"], hdisp[r]["hidden"], f"rank {r} hidden")
        assert_bitwise_equal(res[r]["after"]["out"], houts[r], f"rank {r} combine")


# ----------------------------------------------------------------------------- mid-round errors


def test_error_in_the_middle_of_a_round_poisons_the_buffer(monkeypatch):
    """A rank that raises between receiving a round's messages and finishing the round (here: a
    combine handle of another rank that passes the up-front checks - ordered, below the group's
    largest N - but names a token past this rank's own N) leaves the group's counters out of step:
    its buffer is marked unusable, so its next op fails at once with the reason instead of pairing
    with the wrong messages. Ranks are threads (tests/raw_core.py)."""
    import fused_a2a_core as core

    monkeypatch.setenv("FUSED_A2A_TIMEOUT_S", "5")
    e = 4  # rank 1 owns experts 2, 3: every token goes to rank 1
    ns = (3, 5)  # group_max_tokens = 5
    xs = [np.ones((ns[r], H), np.float32) * (r + 1) for r in range(2)]
    idxs = [np.full((ns[r], 1), 2, np.int64) for r in range(2)]
    with rc.ThreadGroup(2, core.recommended_buffer_bytes(64, 2, 0, 8)) as tg:
        res = tg.run(lambda r: rc.dispatch(tg.gid, r, 2, xs[r], idxs[r], None, e))
        handles = [d["handle"] for d in res]
        handles[1] = dict(handles[1], src_token=handles[1]["src_token"].copy())
        # rows 0..2 of rank 1 came from rank 0's tokens 0, 1, 2; rank 0 has no token 4
        handles[1]["src_token"][2] = 4

        def combine(r):
            return rc.combine(tg.gid, r, res[r]["recv_x"], handles[r])

        out = tg.run(combine, raise_errors=False)
        assert isinstance(out[0], RuntimeError) and "outside" in str(out[0]), out[0]
        assert not isinstance(out[1], Exception), out[1]
        reason = core.buffer_poisoned(tg.gid, 0)
        assert "interrupted the op in round 0" in reason, reason
        assert core.buffer_poisoned(tg.gid, 1) == ""
        start = time.monotonic()
        with pytest.raises(RuntimeError, match="unusable after an earlier failure"):
            rc.dispatch(tg.gid, 0, 2, xs[0], idxs[0], None, e)
        assert time.monotonic() - start < 1.0


def test_corrupt_combine_handle_fails_every_rank_at_once(monkeypatch):
    """A combine handle that is out of order (or out of range) on one rank is found before any row
    moves: that rank raises the details, its peers name it, nobody waits for a timeout, and the
    buffers stay usable."""
    import fused_a2a_core as core

    monkeypatch.setenv("FUSED_A2A_TIMEOUT_S", "30")
    e = 4
    xs = [np.ones((3, H), np.float32) * (r + 1) for r in range(2)]
    idxs = [np.full((3, 1), 2, np.int64) for _ in range(2)]
    with rc.ThreadGroup(2, core.recommended_buffer_bytes(64, 2, 0, 8)) as tg:
        res = tg.run(lambda r: rc.dispatch(tg.gid, r, 2, xs[r], idxs[r], None, e))
        handles = [d["handle"] for d in res]
        handles[1] = dict(handles[1], src_token=handles[1]["src_token"].copy())
        handles[1]["src_token"][0] = -5
        start = time.monotonic()
        out = tg.run(
            lambda r: rc.combine(tg.gid, r, res[r]["recv_x"], handles[r]), raise_errors=False
        )
        assert time.monotonic() - start < 5.0
        assert isinstance(out[1], ValueError) and "recv_src_token" in str(out[1]), out[1]
        assert isinstance(out[0], ValueError) and "rank(s) [1]" in str(out[0]), out[0]
        assert core.buffer_poisoned(tg.gid, 0) == "" and core.buffer_poisoned(tg.gid, 1) == ""
        again = tg.run(lambda r: rc.dispatch(tg.gid, r, 2, xs[r], idxs[r], None, e))
        assert [d["recv_x"].shape[0] for d in again] == [0, 6]


def test_dispatch_notify_wait_checks_its_arguments_and_the_ticket():
    """dispatch_notify_wait (the torch dynamic dispatch's wait for the count exchange's host
    counts): bad arguments name themselves; on CPU the exchange has already run, so a ticket that
    is not in host_counts[3 + L] is an error, not a wait."""
    with rc.ThreadGroup(1, core.recommended_buffer_bytes(64, 1, 0, 8)) as tg:
        host = np.zeros(3 + 2 + 1, np.int32)  # L = 2 local experts
        ptr = host.ctypes.data
        with pytest.raises(ValueError, match=r"ticket must be nonzero, got 0"):
            core.dispatch_notify_wait(tg.gid, 0, ptr, 2, 0)
        with pytest.raises(ValueError, match=r"num_local must be > 0, got -1"):
            core.dispatch_notify_wait(tg.gid, 0, ptr, -1, 5)
        with pytest.raises(ValueError, match=r"host_counts is null"):
            core.dispatch_notify_wait(tg.gid, 0, 0, 2, 5)
        with pytest.raises(RuntimeError, match=r"ticket 5 was not written \(found 0\)"):
            core.dispatch_notify_wait(tg.gid, 0, ptr, 2, 5)
        host[5] = 5
        core.dispatch_notify_wait(tg.gid, 0, ptr, 2, 5)
