"""Shared resources and concurrency (issue 8, CPU).

- Shared memory: every rank's segment is /dev/shm/fa2a_<pid>_<group>_<rank>_<n>, mode 0600, owned
  by this user, a name no other buffer has; it is unlinked once the group is connected (seal), so
  nothing is left after a normal exit nor after a crash later on; a process that dies before that
  leaves its segment behind, and the next process that creates a buffer removes it. A /dev/shm
  too small for a buffer is an error when the buffer is created (not a SIGBUS later).
  (tests/conftest.py checks at the end of the session that no test left a segment behind.)
- The buffer registry is thread-safe: threads create, connect, seal, look up, use and release
  buffers of their own groups while other threads run ops on a shared group.
- Two EP groups of one world used alternately (torch subgroups), normal and HybridEP, handles of
  one group kept across ops of the other: exact results.
- torch and JAX in one process on the same CPU devices, alternately: exact results, and both
  frontends' buffers live side by side in the one registry.
"""

from __future__ import annotations

import concurrent.futures
import os
import shutil
import stat
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import raw_core as rc
import reference as R
from mp import run_ranks
from reference import assert_bitwise_equal

import fused_a2a_core as core

SHM = "/dev/shm"
TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
REPO_ROOT = os.path.dirname(TESTS_DIR)


def _segments(pid: int | None = None) -> set[str]:
    names = {n for n in os.listdir(SHM) if n.startswith("fa2a_")}
    if pid is not None:
        names = {n for n in names if n.startswith(f"fa2a_{pid}_")}
    return names


def _python(code: str, timeout: float = 120) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([TESTS_DIR, REPO_ROOT]))
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


# ----------------------------------------------------------------------------- shared memory


def test_segments_private_unique_and_unlinked_at_seal():
    pid = os.getpid()
    before = _segments(pid)
    gid_a, gid_b = rc.new_group_id(), rc.new_group_id()
    infos_a = [core.buffer_create(gid_a, r, 2, 4096, 0, 0) for r in range(2)]
    core.buffer_create(gid_b, 0, 1, 4096, 0, 0)
    try:
        created = _segments(pid) - before
        assert len(created) == 3, created  # one per rank, unique names
        for name in created:
            st = os.stat(os.path.join(SHM, name))
            assert stat.S_IMODE(st.st_mode) == 0o600, f"{name}: mode {oct(st.st_mode)}"
            assert st.st_uid == os.getuid(), name
            assert st.st_size == 64 * 1024 + 4096, name
        assert any(f"_{gid_a:x}_0_" in n for n in created), created
        for r in range(2):
            core.buffer_connect(gid_a, r, infos_a)
        for r in range(2):
            core.buffer_seal(gid_a, r)
        left = _segments(pid) - before
        assert len(left) == 1 and f"_{gid_b:x}_" in next(iter(left)), left
    finally:
        core.buffer_release(gid_a)
        core.buffer_release(gid_b)
    assert _segments(pid) == before, "release() left a segment behind"


_CREATE_AND_DIE = """
import os, sys
import fused_a2a_core as core
gid = {gid}
info = core.buffer_create(gid, 0, 2, 4096, 0, 0)  # rank 0 of 2: never connected nor sealed
print(os.getpid(), flush=True)
{after}
"""


def test_crash_before_seal_is_cleaned_at_next_start():
    gid = rc.new_group_id()
    proc = _python(_CREATE_AND_DIE.format(gid=gid, after="os._exit(1)"))
    dead_pid = int(proc.stdout.split()[0])
    stale = _segments(dead_pid)
    assert len(stale) == 1, f"the crashed process should have left its unsealed segment: {stale}"
    # the next process that creates a buffer removes segments of processes that are gone
    proc = _python(
        f"import fused_a2a_core as c; c.buffer_create({gid + 1}, 0, 1, 64, 0, 0); "
        f"c.buffer_seal({gid + 1}, 0); c.buffer_release({gid + 1})"
    )
    assert proc.returncode == 0, proc.stderr
    assert not _segments(dead_pid), f"stale segment not removed: {_segments(dead_pid)}"


def test_crash_after_seal_and_exit_leave_nothing():
    cases = {
        "killed after seal": "core.buffer_connect(gid, 0, [info, info])\n"
        "core.buffer_seal(gid, 0)\nos.kill(os.getpid(), 9)",
        "release, then exit": "core.buffer_release_all()\nsys.exit(0)",
        "exit before seal": "sys.exit(0)",  # interrupted bootstrap: unlinked at exit
    }
    for name, after in cases.items():
        proc = _python(_CREATE_AND_DIE.format(gid=rc.new_group_id(), after=after))
        pid = int(proc.stdout.split()[0])
        assert not _segments(pid), f"{name}: left {_segments(pid)}"


def test_full_dev_shm_is_a_clear_error():
    """A /dev/shm too small for the buffer (docker's default is 64 MiB): a RuntimeError that
    says so when the buffer is created, not a SIGBUS at its first use. Needs a private mount
    namespace (unshare -m) to mount a 1 MiB tmpfs on /dev/shm; skipped where that is not allowed."""
    unshare = shutil.which("unshare")
    if unshare is None:
        pytest.skip("needs unshare(1)")
    code = (
        "import fused_a2a_core as c\n"
        "try:\n    c.buffer_create(5, 0, 1, 4 << 20, 0, 0)\n    print('CREATED')\n"
        "except RuntimeError as e:\n    print('ERROR', e)\n"
        "import os; print('LEFT', [n for n in os.listdir('/dev/shm') if n.startswith('fa2a_')])\n"
    )
    script = f'mount -t tmpfs -o size=1m tmpfs /dev/shm && exec {sys.executable} -c "$0"'
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([TESTS_DIR, REPO_ROOT]))
    proc = subprocess.run(
        [unshare, "-m", "sh", "-c", script, code],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    if "ERROR" not in proc.stdout and "CREATED" not in proc.stdout:
        pytest.skip(f"cannot mount a private /dev/shm here: {proc.stderr.strip()[-300:]}")
    assert "ERROR" in proc.stdout, proc.stdout
    assert "No space left on device" in proc.stdout and "/dev/shm" in proc.stdout, proc.stdout
    assert "LEFT []" in proc.stdout, proc.stdout


# ----------------------------------------------------------------------------- registry


def test_registry_is_thread_safe():
    held_before = core.buffer_bytes_held()
    e, n, h, k = 4, 9, 16, 2
    rng = np.random.default_rng(5)
    xs = [rng.standard_normal((n, h), dtype=np.float32) for _ in range(2)]
    idxs = [np.argsort(rng.random((n, e)), axis=1)[:, :k].astype(np.int32) for _ in range(2)]
    ws = [rng.random((n, k), dtype=np.float32) for _ in range(2)]
    ref = R.dispatch(xs, idxs, ws, e)
    shared = rc.ThreadGroup(2, core.recommended_buffer_bytes(64, 2, 0, 2))

    def churn(worker):  # own 1-rank groups: create, connect, seal, use, look up, release
        for _ in range(60):
            gid = rc.new_group_id()
            info = core.buffer_create(gid, 0, 1, 8192, 0, 0)
            core.buffer_connect(gid, 0, [info])
            core.buffer_seal(gid, 0)
            d = rc.dispatch(gid, 0, 1, xs[0], idxs[0] % 2, ws[0], 2)
            assert d["recv_x"].shape[0] == np.count_nonzero((idxs[0] % 2 >= 0).any(1))
            assert core.buffer_data_bytes(gid, 0) == 8192
            core.buffer_bytes_held()
            core.buffer_release(gid)
            assert core.buffer_data_bytes(gid, 0) == 0
            try:  # a released group: a clean error, never a crash
                rc.dispatch(gid, 0, 1, xs[0], idxs[0] % 2, ws[0], 2)
                raise AssertionError("dispatch on a released buffer succeeded")
            except RuntimeError as exc:
                assert "no fused_a2a buffer" in str(exc), exc
        return worker

    def ops(_):  # the shared 2-rank group, driven by its own two threads
        for _ in range(40):
            res = shared.run(lambda r: rc.dispatch(shared.gid, r, 2, xs[r], idxs[r], ws[r], e))
            for r in range(2):
                assert_bitwise_equal(res[r]["recv_x"], ref[r]["recv_x"], f"rank {r} recv_x")
        return "ops"

    try:
        with concurrent.futures.ThreadPoolExecutor(6) as pool:
            futures = [pool.submit(churn, w) for w in range(5)] + [pool.submit(ops, None)]
            for f in futures:
                f.result(timeout=300)
    finally:
        shared.release()
    assert core.buffer_bytes_held() == held_before


# ----------------------------------------------------------------------------- two groups


def _two_group_inputs(ranks, seed, n=6, h=16, k=2, lpr=2):
    e = len(ranks) * lpr
    out = []
    for r in ranks:
        rng = np.random.default_rng([seed, r])
        out.append(
            dict(
                x=rng.standard_normal((n, h), dtype=np.float32).astype(R.BF16),
                idx=np.argsort(rng.random((n, e)), axis=1)[:, :k].astype(np.int64),
                w=rng.random((n, k), dtype=np.float32),
                rmap=rng.random((n, e)) < 0.4,
                probs=rng.random((n, e), dtype=np.float32),
            )
        )
    return out, e, lpr


def _rank_two_groups(rank, world, iterations):
    import torch
    import torch.distributed as dist
    from torch_utils import from_numpy, to_numpy

    import torch_fused_a2a as tfa

    torch.set_num_threads(1)
    # Record every buffer bootstrap exchange (region infos: shm names or CUDA IPC handles) with
    # the ranks it reached, to check that they go to the buffer's group only.
    from torch_fused_a2a import _buffers

    exchanges, gather = [], _buffers.dist.all_gather_object

    def recording_gather(out, obj, group=None):
        if isinstance(obj, bytes):  # a region info (core.buffer_create)
            exchanges.append(tuple(dist.get_process_group_ranks(group)))
        return gather(out, obj, group=group)

    _buffers.dist.all_gather_object = recording_gather  # torch.distributed's, in this process
    pairs = [dist.new_group([0, 1]), dist.new_group([2, 3])]  # every rank creates both
    groups = {
        "world": (dist.group.WORLD, list(range(world))),
        "pair": (pairs[rank // 2], [0, 1] if rank < 2 else [2, 3]),
    }
    out = []
    for it in range(iterations):
        step = {}
        pending = []
        for name in ("world", "pair"):  # dispatch on both groups, then combine on both
            group, ranks = groups[name]
            inp, e, lpr = _two_group_inputs(ranks, [it, len(ranks)])
            mine = {k: from_numpy(v) for k, v in inp[ranks.index(rank)].items()}
            recv_x, _, _, _, handle = tfa.FusedDispatch.apply(
                mine["x"], mine["idx"], mine["w"], e, group
            )
            hidden, _, _, _, hhandle = tfa.hybrid_ep_dispatch(
                mine["x"], mine["rmap"], mine["probs"], group, lpr
            )
            pending.append((name, group, recv_x, handle, hidden, hhandle))
        for name, group, recv_x, handle, hidden, hhandle in reversed(pending):
            out_x, _ = tfa.FusedCombine.apply(recv_x, group, handle)
            hout = tfa.hybrid_ep_combine(hidden, hhandle)
            step[name] = dict(
                recv_x=to_numpy(recv_x),
                out=to_numpy(out_x),
                hidden=to_numpy(hidden),
                hout=to_numpy(hout),
            )
        out.append(step)
    return dict(steps=out, exchanges=exchanges)


def test_two_groups_used_alternately():
    iterations, world = 3, 4
    got_all = run_ranks(_rank_two_groups, world, iterations, timeout=240)
    for r, got in enumerate(got_all):  # region infos went to the buffer's group only
        pair = (0, 1) if r < 2 else (2, 3)
        assert set(got["exchanges"]) == {(0, 1, 2, 3), pair}, (r, got["exchanges"])
    res = [got["steps"] for got in got_all]
    for it in range(iterations):
        for name, groups in (("world", [[0, 1, 2, 3]]), ("pair", [[0, 1], [2, 3]])):
            for ranks in groups:
                got = [res[r][it][name] for r in ranks]
                assert_group_results(got, ranks, [it, len(ranks)], f"iteration {it} group {name}")


def two_group_reference(ranks, seed):
    """The reference of one group's step on _two_group_inputs: dispatch, combine of the received
    rows, HybridEP dispatch, HybridEP combine of the permuted rows."""
    inp, e, lpr = _two_group_inputs(ranks, seed)
    disp = R.dispatch([i["x"] for i in inp], [i["idx"] for i in inp], [i["w"] for i in inp], e)
    outs, _ = R.combine([d["recv_x"] for d in disp], disp, [6] * len(ranks))
    hd = R.hybrid_dispatch(
        [i["x"] for i in inp], [i["rmap"] for i in inp], [i["probs"] for i in inp], lpr
    )
    houts, _ = R.hybrid_combine([d["hidden"] for d in hd], hd)
    return disp, outs, hd, houts


def assert_group_results(got, ranks, seed, tag):
    """got[j]: the step's results (recv_x, out, hidden, hout) of ranks[j], bit for bit."""
    disp, outs, hd, houts = two_group_reference(ranks, seed)
    for j, r in enumerate(ranks):
        where = f"{tag} rank {r}"
        assert_bitwise_equal(got[j]["recv_x"], disp[j]["recv_x"], f"{where} recv_x")
        assert_bitwise_equal(got[j]["out"], outs[j], f"{where} combine")
        assert_bitwise_equal(got[j]["hidden"], hd[j]["hidden"], f"{where} hybrid")
        assert_bitwise_equal(got[j]["hout"], houts[j], f"{where} hybrid combine")


# ----------------------------------------------------------------------------- torch + JAX


def jax_round_trip(devices, e):
    """A jitted shard_map over `devices` (the EP group): dispatch, then combine of the received
    rows. Returns run(inputs of _two_group_inputs) -> (recv_x, combined) as numpy."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import Mesh
    from jax.sharding import PartitionSpec as P

    import jax_fused_a2a as jfa

    mesh = Mesh(np.array(devices), ("ep",))

    def body(x, idx, w):
        d = jfa.dispatch(x, idx, w, num_experts=e, axis_name="ep")
        return d.recv_x, jfa.combine(d.recv_x, d.handle, axis_name="ep")

    step = jax.jit(
        jax.shard_map(body, mesh=mesh, in_specs=(P("ep"),) * 3, out_specs=(P("ep"), P("ep")))
    )

    def run(inp):
        x = jnp.asarray(np.concatenate([i["x"] for i in inp]))
        idx = jnp.asarray(np.concatenate([i["idx"] for i in inp]).astype(np.int32))
        w = jnp.asarray(np.concatenate([i["w"] for i in inp]))
        return tuple(np.asarray(a) for a in step(x, idx, w))

    return run


def _rank_torch_and_jax(rank, world):
    import torch
    import torch.distributed as dist
    from torch_utils import from_numpy, to_numpy

    import torch_fused_a2a as tfa

    torch.set_num_threads(1)
    import jax

    devices = jax.devices("cpu")
    assert len(devices) == 2, devices
    n, e = 6, 4
    jax_step = jax_round_trip(devices, e)
    results = []
    for it in range(3):
        inp, _, _ = _two_group_inputs([0, 1], [it, 7])
        mine = {k: from_numpy(v) for k, v in inp[rank].items()}
        recv_x, _, _, _, handle = tfa.FusedDispatch.apply(
            mine["x"], mine["idx"], mine["w"], e, dist.group.WORLD
        )
        out, _ = tfa.FusedCombine.apply(recv_x, dist.group.WORLD, handle)
        # JAX: both "ranks" of the EP group are this process's two CPU devices
        jrecv, jout = jax_step(inp)
        results.append(dict(recv_x=to_numpy(recv_x), out=to_numpy(out), jrecv=jrecv, jout=jout))
    import fused_a2a_core as c

    held = c.buffer_bytes_held()
    torch_bytes = tfa.get_buffer(dist.group.WORLD, 32).bytes_held()
    return results, held, torch_bytes, n


def test_torch_and_jax_in_one_process():
    env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=2", "JAX_PLATFORMS": "cpu"}
    res = run_ranks(_rank_torch_and_jax, 2, timeout=240, env=env)
    for rank, (results, held, torch_bytes, n) in enumerate(res):
        assert held > torch_bytes > 0, "the JAX buffers should live next to torch's"
        for it, got in enumerate(results):
            inp, e, _ = _two_group_inputs([0, 1], [it, 7])
            disp = R.dispatch(
                [i["x"] for i in inp], [i["idx"] for i in inp], [i["w"] for i in inp], e
            )
            outs, _ = R.combine([d["recv_x"] for d in disp], disp, [n, n])
            tag = f"process {rank} iteration {it}"
            assert_bitwise_equal(got["recv_x"], disp[rank]["recv_x"], f"{tag} torch recv_x")
            assert_bitwise_equal(got["out"], outs[rank], f"{tag} torch combine")
            c = got["jrecv"].shape[0] // 2  # JAX: static C = G*N rows per device
            for d in range(2):
                m = disp[d]["num_recv"]
                assert_bitwise_equal(
                    got["jrecv"][d * c : d * c + m],
                    disp[d]["recv_x"],
                    f"{tag} jax device {d} recv_x",
                )
                assert_bitwise_equal(got["jout"][d * n : (d + 1) * n], outs[d], f"{tag} jax out")


def test_buffer_rows_default_and_bad_env(monkeypatch):
    """Rows a new buffer is sized for, shared by both frontends and modes
    (core.default_buffer_rows): 256 on CPUs, 8192 on GPUs (4096 before session 13),
    FUSED_A2A_BUFFER_ROWS when set; a bad value is an error naming the variable and the value
    (the torch HybridEP buffer clamped it to 1 before session 7)."""
    monkeypatch.delenv("FUSED_A2A_BUFFER_ROWS", raising=False)
    assert core.default_buffer_rows(0) == 256
    assert core.default_buffer_rows(1) == 8192
    monkeypatch.setenv("FUSED_A2A_BUFFER_ROWS", "7")
    assert core.default_buffer_rows(0) == core.default_buffer_rows(1) == 7
    for bad in ("0", "-3"):
        monkeypatch.setenv("FUSED_A2A_BUFFER_ROWS", bad)
        with pytest.raises(ValueError, match=f"FUSED_A2A_BUFFER_ROWS.*'{bad}'"):
            core.default_buffer_rows(0)
