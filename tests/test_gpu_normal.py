"""Normal mode on CUDA GPUs (SEMANTICS.md section 1), bit for bit.

- torch, one process per GPU (tests/mp.py, gloo bootstrap): the CPU suite's cases
  (tests/test_torch_normal.py) with CUDA tensors, against the NumPy reference and against the CPU
  backend run on the same inputs in the same processes; forward and backward.
- JAX, one process driving every GPU: the CPU suite of tests/jax_cases.py on GPU devices, also
  with one-row buffers (every op takes many rounds).
- torch on GPU vs JAX on GPU on the same inputs, bitwise.
- 1,000 iterations of fresh random routing (no drift; GPU memory before/after reported), a CUDA
  graph capture of the static path, and a timeout that names the op and the missing rank.
- Larger rows over many rounds, capacity drops and FP8 rows (static sizes, every variant of the
  static path): tests/test_gpu_static_rows.py, through the variant spawns below.

Skipped unless at least two CUDA GPUs are visible.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest
import reference as R
from conftest import gpu_count
from mp import run_once, run_ranks
from reference import assert_bitwise_equal

pytestmark = pytest.mark.gpu
TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
REPO_ROOT = os.path.dirname(TESTS_DIR)
# The op timeout inside the GPU tests' ranks (FA2A_GPU_TEST_TIMEOUT_S: shorter on a first run of new
# kernels, so a hang costs seconds of device time, not minutes).
GPU_ENV = {
    "FUSED_A2A_TIMEOUT_S": os.environ.get("FA2A_GPU_TEST_TIMEOUT_S", "60"),
    "NCCL_NVLS_ENABLE": "0",
    "PYTHONFAULTHANDLER": "1",
}


def _need(n: int):
    if gpu_count() < max(n, 2):
        pytest.skip(f"needs {max(n, 2)} CUDA GPUs, {gpu_count()} visible")


# ----------------------------------------------------------------------------- torch: CPU suite


def _rank_suite(rank, world, cases, group=None):
    import test_torch_normal as T
    import torch
    import torch.distributed as dist

    torch.cuda.set_device(rank)
    torch.set_num_threads(1)
    tfa = T._api()
    host_from_numpy = T.from_numpy
    whole = group or dist.group.WORLD
    groups, results = {}, {}
    for case in cases:
        size = case.group_size or world
        if size not in groups:
            subgroups = [dist.new_group(list(range(i, i + size))) for i in range(0, world, size)]
            groups[size] = whole if size == world else subgroups[rank // size]
        group, gi = groups[size], rank // size
        out = {}
        for where in ("cuda", "cpu"):
            T.from_numpy = (
                (lambda a: host_from_numpy(a).cuda()) if where == "cuda" else host_from_numpy
            )
            try:
                out[where] = T._run_case(tfa, group, dist.get_rank(group), gi, case)
            except Exception:
                import traceback

                out[where] = {"error": traceback.format_exc()}
            finally:
                T.from_numpy = host_from_numpy
        results[case.name] = out
    return results


# Who copies the dispatch's own rows: by default the receiver warps up to 512 tokens (every suite
# case) and the senders above; "senders" forces the senders' path on the same cases, "split"
# both, chunk by chunk; "dealt": the senders', with items dealt round-robin to the sender warps
# instead of claimed from a counter, in the dispatch and the combine (FUSED_A2A_CUDA_CLAIM=0,
# FUSED_A2A_CUDA_COMBINE_CLAIM=0; claiming is the default of both).
# The records' index and weight words as 16-byte loads (session 23, the default since session 24)
# in the kernels that have them: the fused scan's, forced here at every N (the suites' small N
# take the one-block scan and word loads by default)
META_VEC = {"FUSED_A2A_CUDA_META_VEC": "1", "FUSED_A2A_CUDA_SCAN": "fused"}
# The route scan's first pass in the fused-scan kernels too (session 25): each tile's counts
# published by a flag the kernel's other blocks wait for, no route_mask_kernel before them
PASS1 = {"FUSED_A2A_CUDA_SCAN_PASS1": "fused"}
# Receiver warps pushing rows with plain stores beside the senders' bulk copies in one-round ops
# (session 25), then claiming receiver items; many-round ops keep them receiving only
# (the default since session 26: 4 a block)
PUSH = {"FUSED_A2A_CUDA_RECV_PUSH": "4"}
NO_PUSH = {"FUSED_A2A_CUDA_RECV_PUSH": "0"}

OWN_ROWS = {
    "default": {},
    "senders": {"FUSED_A2A_CUDA_SELF": "send"},
    "split": {"FUSED_A2A_CUDA_SELF": "split"},
    "dealt": {
        "FUSED_A2A_CUDA_SELF": "send",
        "FUSED_A2A_CUDA_CLAIM": "0",
        "FUSED_A2A_CUDA_COMBINE_CLAIM": "0",
    },
    # The dispatch's metadata records precomputed by their own kernel (FUSED_A2A_CUDA_RECORDS=1,
    # session 10; by default for FP8 rows above 512 tokens without pushing receiver warps only),
    # own rows by the senders (records pushed as bulk pieces), and the route scan in two passes
    # (FUSED_A2A_CUDA_SCAN=tiles; by default above 1024 tokens only, so these cases would take
    # the one-block scan).
    "records": {
        "FUSED_A2A_CUDA_SELF": "send",
        "FUSED_A2A_CUDA_RECORDS": "1",
        "FUSED_A2A_CUDA_SCAN": "tiles",
    },
    # the records' index (int64) and weight words as 16-byte loads where K % 4 == 0 (session 23;
    # the suite's other K fall back to word loads), own rows by the senders and the receivers
    "meta_vec": {**META_VEC, "FUSED_A2A_CUDA_SELF": "split"},
    # the route scan's first pass in the kernels (session 25), forced fused at every N: the
    # static dispatch, the speculative one with its host counts, the combine
    "pass1": {**META_VEC, **PASS1},
    # receiver warps pushing rows too (session 25), own rows by the senders' items and so by the
    # pushing receivers too
    "recv_push": {**META_VEC, **PUSH, "FUSED_A2A_CUDA_SELF": "send"},
    # the combine's weights (the dispatch backward's) through the senders' rings (session 26;
    # K % 4 == 0 cases) or stored by the lanes with a fence before each chunk's flag, both forced
    # (the default since session 28: the rings)
    "weights_bulk": {"FUSED_A2A_CUDA_COMBINE_WEIGHTS": "bulk"},
    "weights_lanes": {"FUSED_A2A_CUDA_COMBINE_WEIGHTS": "lanes"},
    # on 2 ranks the combine's reducers with 4 vectors a source a step, as on more ranks (before
    # session 26; by default 8 there: reduce_row_once)
    "reduce_batch": {"FUSED_A2A_CUDA_REDUCE": "batch"},
    # the combine's reducers without / with their next token's L2 prefetch, both forced (the
    # default since session 28: without)
    "no_prefetch": {"FUSED_A2A_CUDA_REDUCE_PREFETCH": "0"},
    "prefetch": {"FUSED_A2A_CUDA_REDUCE_PREFETCH": "1"},
    # dispatch_notify publishes every rank's layout, so the dispatch_data right after it sends no
    # ready message (FUSED_A2A_CUDA_LAYOUT=dynamic, session 13)
    "layout_dynamic": {"FUSED_A2A_CUDA_LAYOUT": "dynamic"},
    # the cached dispatch of the combine's backward through dispatch_data and its ready message
    # (FUSED_A2A_CUDA_CACHED=data; since session 29 a static dispatch by default), with the arena
    # and the message's direct rows
    "cached_data": {"FUSED_A2A_CUDA_CACHED": "data", "FUSED_A2A_TORCH_ARENA_MB": "16"},
    # recv_x in the buffer's output arena (FUSED_A2A_TORCH_ARENA_MB, session 19; 2048 MB by
    # default on CUDA since session 21), so the static kernel's senders write the rows straight
    # into it (direct rows); "require" fails a static dispatch whose recv_x is not there, so the
    # path cannot pass unused. 16 MB: these cases' outputs are small, and the CPU backend's
    # buffers of the same ranks take it in /dev/shm too. "window": no arena, so every torch
    # dispatch's rows go through the receive window (the default before session 21)
    "window": {"FUSED_A2A_TORCH_ARENA_MB": "0"},
    "arena": {"FUSED_A2A_TORCH_ARENA_MB": "16", "FUSED_A2A_CUDA_DIRECT": "require"},
    # the arena's blocks from the Python free list instead of the core's (session 20's A/B)
    "arena_python": {
        "FUSED_A2A_TORCH_ARENA_MB": "16",
        "FUSED_A2A_CUDA_DIRECT": "require",
        "FUSED_A2A_TORCH_ARENA_ALLOC": "python",
    },
    # direct rows only by the layout notify: the dispatches with a ready message (the exact
    # dynamic one) through the window
    # (FUSED_A2A_CUDA_DIRECT_READY=0; the default sends them direct by the message too)
    "arena_layout": {
        "FUSED_A2A_TORCH_ARENA_MB": "16",
        "FUSED_A2A_CUDA_DIRECT": "require",
        "FUSED_A2A_CUDA_DIRECT_READY": "0",
    },
}


def _selected_own(request, world):
    """The OWN_ROWS variants at `world` that this session's selection runs, so that one spawn
    runs them all (see _rank_variants) and a narrow selection runs only its own."""
    chosen = set()
    for item in request.session.items:
        params = getattr(getattr(item, "callspec", None), "params", {})
        if (
            getattr(item, "originalname", "") == "test_torch_gpu_matches_reference_and_cpu"
            and params.get("world") == world
        ):
            chosen.add(params["own"])
    return [own for own in OWN_ROWS if own in chosen]


def _suite(world, own, request):
    import test_torch_normal as T

    variants = {o: OWN_ROWS[o] for o in _selected_own(request, world) or [own]}
    per_rank = _variants_run(_rank_suite, world, T.WORLD_CASES[world], variants, GPU_ENV, 1800)
    return _variant_of(per_rank, own)


def _suite_cases():
    import test_torch_normal as T

    return [(w, c) for w in (2, 3, 4) for c in T.WORLD_CASES[w]]


@pytest.mark.parametrize("own", list(OWN_ROWS))
@pytest.mark.parametrize("world,case", _suite_cases(), ids=lambda v: getattr(v, "name", str(v)))
def test_torch_gpu_matches_reference_and_cpu(world, case, own, request):
    import test_torch_normal as T

    _need(world)
    suite = _suite(world, own, request)
    per_rank = [suite[r][case.name] for r in range(world)]
    for r, res in enumerate(per_rank):
        for where in ("cuda", "cpu"):
            assert "error" not in res[where], f"rank {r} {where}:\n{res[where].get('error')}"
    gpu = [p["cuda"] for p in per_rank]
    for gi, ranks in T._groups(world, case):
        inp, disp = T._reference(case, gi)
        ys = [gpu[r]["y"] for r in ranks]
        outs, _ = R.combine(ys, disp, case.ns)
        dys = R.combine_backward(inp["gouts"], disp)
        dxs, dws = R.dispatch_backward(
            [gpu[r]["d_recv_x"] for r in ranks],
            [gpu[r]["d_recv_w"] for r in ranks],
            disp,
            inp["idxs"],
        )
        for j, r in enumerate(ranks):
            got, tag = gpu[r], f"rank {r} (GPU)"
            assert_bitwise_equal(got["recv_x"], disp[j]["recv_x"], f"{tag} recv_x")
            assert_bitwise_equal(
                got["recv_idx"].astype(np.int64),
                disp[j]["recv_topk_idx"].astype(np.int64),
                f"{tag} recv idx",
            )
            assert_bitwise_equal(got["recv_w"], disp[j]["recv_topk_weights"], f"{tag} recv_w")
            assert got["tpe_meta"] == ("torch.int64", "cpu"), f"{tag} tokens_per_expert"
            assert_bitwise_equal(got["tpe"], disp[j]["tokens_per_expert"], f"{tag} tpe")
            assert_bitwise_equal(got["out"], outs[j], f"{tag} combined_x")
            assert_bitwise_equal(got["dy"], dys[j], f"{tag} combine backward")
            assert_bitwise_equal(got["dx"], dxs[j], f"{tag} x.grad")
            assert_bitwise_equal(got["dw"], dws[j], f"{tag} token_probs.grad")
            # The CPU backend on the same inputs. Values computed by torch itself between the
            # ops (y, and the gradients of the local op) may differ between devices in rounding,
            # so an op's output is compared only where its inputs agree.
            cpu = per_rank[r]["cpu"]
            for key in ("recv_x", "recv_idx", "recv_w", "tpe"):
                assert_bitwise_equal(got[key], cpu[key], f"{tag} {key} vs CPU backend")
            for out_key, in_key in (("out", "y"), ("dy", None), ("dx", "d_recv_x")):
                if in_key is None or np.array_equal(
                    got[in_key].view(np.uint8), cpu[in_key].view(np.uint8)
                ):
                    assert_bitwise_equal(got[out_key], cpu[out_key], f"{tag} {out_key} vs CPU")


# ----------------------------------------------------------------------------- JAX on GPUs


def _jax_env(extra=None):
    env = dict(os.environ)
    env.update(GPU_ENV)
    env.update(
        JAX_PLATFORMS="cuda",
        XLA_PYTHON_CLIENT_PREALLOCATE="false",
        PYTHONPATH=os.pathsep.join(
            p for p in (env.get("PYTHONPATH", ""), REPO_ROOT, TESTS_DIR) if p
        ),
    )
    env.pop("XLA_FLAGS", None)
    env.update(extra or {})
    return env


def _jax_suite(g, rows=None, suite="normal", rows_path="direct"):
    """Runs tests/jax_cases.py SUITE on g GPU devices (once per session); {case: "ok" | error}.
    rows_path: how the static dispatch's rows reach a peer in this process (JAX_ROWS_PATHS)."""

    def run():
        extra = {"FUSED_A2A_BUFFER_ROWS": str(rows)} if rows else {}
        extra.update(JAX_ROWS_PATHS[rows_path])
        proc = subprocess.run(
            [sys.executable, os.path.join(TESTS_DIR, "jax_cases.py"), suite, str(g)],
            env=_jax_env(extra),
            capture_output=True,
            text=True,
            timeout=900,
            cwd=TESTS_DIR,
        )
        for line in reversed(proc.stdout.splitlines()):
            if line.startswith("RESULTS "):
                return json.loads(line[len("RESULTS ") :])
        raise AssertionError(
            f"JAX GPU {suite} suite exited {proc.returncode}:\n"
            f"{(proc.stdout + proc.stderr)[-6000:]}"
        )

    return run_once(("jax", suite, g, rows, rows_path), run)


# How the static dispatch's rows reach a receiver in the same process (JAX with several local
# GPUs): written by the senders straight into its recv_x (the default since session 19;
# FUSED_A2A_CUDA_DIRECT=require makes a group not all in this process an error, so these cases
# cannot pass through the window), or through its window, copied to recv_x by its receiver warps
# (FUSED_A2A_CUDA_DIRECT=0). The one-row buffer
# runs every case in many rounds, whose records still travel through the window.
JAX_ROWS_PATHS = {
    "direct": {"FUSED_A2A_CUDA_DIRECT": "require"},
    "window": {"FUSED_A2A_CUDA_DIRECT": "0"},
    # the static dispatch direct, the cached dispatch of the combine's backward through
    # dispatch_data (FUSED_A2A_CUDA_CACHED=data; by default a static dispatch since session 29)
    # and the window (FUSED_A2A_CUDA_DIRECT_READY=0; by default its ready message places it
    # direct too)
    "direct_layout": {
        "FUSED_A2A_CUDA_DIRECT": "require",
        "FUSED_A2A_CUDA_DIRECT_READY": "0",
        "FUSED_A2A_CUDA_CACHED": "data",
    },
    # the cached dispatch through dispatch_data, direct by its ready message
    "direct_cached_data": {"FUSED_A2A_CUDA_DIRECT": "require", "FUSED_A2A_CUDA_CACHED": "data"},
    # the records' index (int32 here) and weight words as 16-byte loads (session 23)
    "direct_meta_vec": {"FUSED_A2A_CUDA_DIRECT": "require", **META_VEC},
    # the route scan's first pass in the kernels too (session 25)
    "direct_pass1": {"FUSED_A2A_CUDA_DIRECT": "require", **META_VEC, **PASS1},
    # receiver warps pushing rows too (session 25); in the one-row buffer every op has many rounds
    "direct_push": {"FUSED_A2A_CUDA_DIRECT": "require", **META_VEC, **PUSH},
}


@pytest.mark.parametrize("g", [2, 4])
@pytest.mark.parametrize("rows", [None, 1], ids=["default-buffer", "one-row-buffer"])
@pytest.mark.parametrize("rows_path", list(JAX_ROWS_PATHS))
def test_jax_gpu_suite(g, rows, rows_path):
    _need(g)
    results = _jax_suite(g, rows, rows_path=rows_path)
    bad = {k: v for k, v in results.items() if v != "ok"}
    assert results and not bad, "\n".join(f"{k}: {v}" for k, v in bad.items())


# ----------------------------------------------------------------------------- torch vs JAX

_JAX_WORKER = r"""
import sys, numpy as np, ml_dtypes, jax, jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec as P
import jax_fused_a2a as fa
from jax_cases import to_global, split
d = np.load(sys.argv[1])
g, e = int(d["g"]), int(d["e"])
mesh = Mesh(np.array(jax.devices()[:g]), ("ep",))
def body(x, idx, w):
    r = fa.dispatch(x, idx, w, num_experts=e, axis_name="ep")
    y = (r.recv_x.astype(jnp.float32) * 1.5).astype(x.dtype)
    out = fa.combine(y, r.handle, axis_name="ep")
    return r.recv_x, r.recv_topk_idx, r.recv_topk_weights, r.num_recv_tokens[None], out
f = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=(P("ep"),) * 3, out_specs=(P("ep"),) * 5))
outs = f(to_global(mesh, d["x"].view(ml_dtypes.bfloat16)), to_global(mesh, d["idx"]),
         to_global(mesh, d["w"]))
names = ("recv_x", "recv_idx", "recv_w", "num_recv", "out")
res = {n: np.stack(split(o, g)) for n, o in zip(names, outs)}
res = {n: (a.view(np.uint16) if a.dtype == ml_dtypes.bfloat16 else a) for n, a in res.items()}
np.savez(sys.argv[2], **res)
"""


def _tj_inputs(g, n=96, h=2048, k=4, e=32, seed=7):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((g * n, h), dtype=np.float32).astype(R.BF16)
    idx = np.stack([rng.permutation(e)[:k] for _ in range(g * n)]).astype(np.int32)
    idx[rng.random(idx.shape) < 0.2] = -1
    w = rng.random((g * n, k)).astype(np.float32)
    return dict(g=g, e=e, n=n, x=x.view(np.uint16), idx=idx, w=w)


def _rank_tj(rank, world, inp):
    import torch
    from torch_utils import from_numpy, to_numpy

    import torch_fused_a2a as tfa

    torch.cuda.set_device(rank)
    n = inp["n"]
    sl = slice(rank * n, (rank + 1) * n)
    x = from_numpy(inp["x"][sl].view(R.BF16)).cuda()
    idx = from_numpy(inp["idx"][sl].astype(np.int64)).cuda()
    w = from_numpy(inp["w"][sl]).cuda()
    import torch.distributed as dist

    recv_x, recv_idx, recv_w, _, handle = tfa.fused_dispatch(x, idx, w, inp["e"], dist.group.WORLD)
    y = (recv_x.float() * 1.5).to(recv_x.dtype)
    out, _ = tfa.fused_combine(y, dist.group.WORLD, handle)
    return dict(
        recv_x=to_numpy(recv_x),
        recv_idx=to_numpy(recv_idx),
        recv_w=to_numpy(recv_w),
        out=to_numpy(out),
    )


@pytest.mark.parametrize("rows_path", list(JAX_ROWS_PATHS))
def test_torch_vs_jax_bitwise(tmp_path, rows_path):
    g = min(4, gpu_count())
    _need(2)
    inp = _tj_inputs(g)
    np.savez(tmp_path / "in.npz", **inp)
    proc = subprocess.run(
        [sys.executable, "-c", _JAX_WORKER, str(tmp_path / "in.npz"), str(tmp_path / "out.npz")],
        env=_jax_env(JAX_ROWS_PATHS[rows_path]),
        capture_output=True,
        text=True,
        timeout=600,
        cwd=TESTS_DIR,
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    jx = np.load(tmp_path / "out.npz")
    th = run_ranks(_rank_tj, g, inp, timeout=300, env=GPU_ENV)
    for r in range(g):
        m = int(jx["num_recv"][r].reshape(-1)[0])
        assert m == th[r]["recv_x"].shape[0], f"rank {r}: JAX num_recv {m}"
        assert_bitwise_equal(
            th[r]["recv_x"].view(np.uint16), jx["recv_x"][r][:m], f"rank {r} recv_x torch vs JAX"
        )
        assert_bitwise_equal(
            th[r]["recv_idx"].astype(np.int32),
            jx["recv_idx"][r][:m].astype(np.int32),
            f"rank {r} recv idx torch vs JAX",
        )
        assert_bitwise_equal(th[r]["recv_w"], jx["recv_w"][r][:m], f"rank {r} recv_w torch vs JAX")
        assert_bitwise_equal(
            th[r]["out"].view(np.uint16), jx["out"][r], f"rank {r} combine torch vs JAX"
        )


# ------------------------------------------------------------------------- variants, one spawn


def _rank_variants(rank, world, rank_fn, cases, variants):
    """rank_fn(rank, world, cases, group) under every entry of `variants` (name: environment) in
    one process, {variant: its result or {"error": traceback}}: one spawn per buffer size instead
    of one per variant (each spawn is ~10 s of process, CUDA and group start at G = 4; run 72 ran
    out of its step). A variant sets its environment (the kernels read these knobs at every
    launch) and runs in a new process group, so with a buffer of its own (no handshake state
    carries over between variants)."""
    import os
    import traceback

    import torch.distributed as dist

    out = {}
    for name, env in variants.items():
        saved = {key: os.environ.get(key) for key in env}
        os.environ.update(env)
        try:
            out[name] = rank_fn(rank, world, cases, dist.new_group(list(range(world))))
        except Exception:  # noqa: BLE001 (reported by the variant's test)
            out[name] = {"error": traceback.format_exc()}
        finally:
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value
    return out


def _variants_run(rank_fn, g, cases, variants, env, timeout):
    """_rank_variants' per-rank results, one spawn a session per rank_fn, G and environment."""
    key = (rank_fn.__name__, g, tuple(sorted(env.items())))
    return run_once(
        key,
        lambda: run_ranks(_rank_variants, g, rank_fn, cases, variants, timeout=timeout, env=env),
    )


def _variant_of(per_rank, variant, pop=False):
    """One variant's results, per rank (popped: they are no longer needed after its test); a
    variant's error fails its own test."""
    res = [r.pop(variant) if pop else r[variant] for r in per_rank]
    for r, got in enumerate(res):
        assert "error" not in got, f"rank {r}, variant {variant}:\n{got['error']}"
    return res


def _variant_results(rank_fn, g, rows, cases, variants, variant):
    """rank_fn's results of `variant` (one spawn per rank_fn and buffer size for all variants);
    popped, as the results of all variants are ~50 MB a variant and rank."""
    env = dict(GPU_ENV, FUSED_A2A_BUFFER_ROWS=rows)
    per_rank = _variants_run(rank_fn, g, cases, variants, env, 900)
    return _variant_of(per_rank, variant, pop=True)


# ----------------------------------------------------------------------------- stress, graphs


def _rank_stress(rank, world, iters, h):
    import torch
    import torch.distributed as dist

    import fused_a2a_core as core
    import torch_fused_a2a as tfa

    torch.cuda.set_device(rank)
    group = dist.group.WORLD
    gen = torch.Generator(device="cuda").manual_seed(1234 + rank)
    e, k = 64, 8
    bad, mem = [], {}
    start = time.monotonic()
    for it in range(iters):
        if it == min(100, iters // 10):  # after the warm-up: allocator pools and buffers settled
            torch.cuda.synchronize()
            mem["before"] = torch.cuda.memory_allocated()
            mem["bytes_held_before"] = core.buffer_bytes_held()
            mem["rss_before"] = _rss_bytes()
        if it and it % 10000 == 0:
            print(f"rank {rank}: {it} iterations, {time.monotonic() - start:.0f} s", flush=True)
        n = int(torch.randint(0, 257, (1,), generator=gen, device="cuda").item())
        x = torch.randn(n, h, device="cuda", generator=gen).to(torch.bfloat16)
        idx = torch.argsort(torch.rand(n, e, device="cuda", generator=gen), dim=1)[:, :k]
        idx = idx.contiguous()
        idx[torch.rand(n, k, device="cuda", generator=gen) < 0.3] = -1
        w = torch.rand(n, k, device="cuda", generator=gen)
        rx, ridx, rw, tpe, handle = tfa.fused_dispatch(x, idx, w, e, group)
        out, _ = tfa.fused_combine(rx, group, handle)
        owners = torch.where(idx >= 0, idx // (e // world), -1)
        cnt = torch.stack([(owners == g).any(1) for g in range(world)], 1).sum(1)
        expect = ((x.float() * cnt[:, None].float()) + 0.0).to(torch.bfloat16)
        ok = torch.equal(out.view(torch.int16), expect.view(torch.int16))
        ok = ok and int(tpe.sum()) == int((ridx >= 0).sum())
        if not ok:
            bad.append(it)
    torch.cuda.synchronize()
    mem["after"] = torch.cuda.memory_allocated()
    mem["bytes_held_after"] = core.buffer_bytes_held()
    mem["rss_after"] = _rss_bytes()
    mem["seconds"] = round(time.monotonic() - start, 1)
    from torch_fused_a2a import _arena, fused_a2a

    arena = _arena.find(fused_a2a._buffer.group_id)  # FUSED_A2A_TORCH_ARENA_MB
    if arena is not None:
        del rx, ridx, rw, tpe, handle, out
        mem["arena_free_after"], mem["arena_bytes"] = arena.free_bytes(), arena.size
    return dict(bad=bad[:20], nbad=len(bad), mem=mem)


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


# Launch shapes (num_sms), chunk sizes and item orders that must not change a single bit.
DETERMINISM_CONFIGS = (
    (24, None, {}),
    (8, 1, {}),
    (16, 8, {}),
    (32, 64, {}),
    (2, 3, {}),
    # The item orders: destination-major, and the senders copying the own rows (one more column;
    # the default for these 300 tokens is the receivers).
    (24, 8, {"FUSED_A2A_CUDA_ORDER": "dst"}),
    (24, 8, OWN_ROWS["senders"]),
    (8, 1, {**OWN_ROWS["senders"], "FUSED_A2A_CUDA_ORDER": "dst"}),
    (32, 64, OWN_ROWS["senders"]),
    (16, 2, OWN_ROWS["split"]),
    (8, 1, OWN_ROWS["dealt"]),
    (2, 3, {"FUSED_A2A_CUDA_CLAIM": "0"}),
    (2, 3, {"FUSED_A2A_CUDA_COMBINE_CLAIM": "0"}),
    (16, 8, {"FUSED_A2A_CUDA_COMBINE_CLAIM": "0", "FUSED_A2A_CUDA_CLAIM": "0"}),
    # The bulk-copy rings (16 stages of these 512-byte rows) with 1-3 loads ahead of their
    # stores instead of 14, i.e. 13-15 stores in flight, also with the senders copying own rows.
    (24, 8, {"FUSED_A2A_CUDA_LOADS_AHEAD": "1", "FUSED_A2A_CUDA_STAGE_KB": "1"}),
    (16, 2, {"FUSED_A2A_CUDA_LOADS_AHEAD": "2", **OWN_ROWS["senders"]}),
    (8, 1, {"FUSED_A2A_CUDA_LOADS_AHEAD": "3", "FUSED_A2A_CUDA_STAGE_KB": "2"}),
    # The receivers copy a chunk in row slices (several warps a chunk): own rows by the
    # receivers (the default here), split, and 64-row chunks in slices of 5 (a short last one).
    (24, 8, {"FUSED_A2A_CUDA_RECV_ROWS": "1"}),
    (16, 8, {"FUSED_A2A_CUDA_RECV_ROWS": "3", **OWN_ROWS["split"]}),
    (32, 64, {"FUSED_A2A_CUDA_RECV_ROWS": "5"}),
    # Precomputed metadata records (own rows by the receivers here, then by the senders), the
    # route scan in two passes against the one-block default of these 300 tokens, and receiver
    # items of whole chunks against the 2-row default (session 10).
    (24, 8, {"FUSED_A2A_CUDA_RECORDS": "1"}),
    # the records' index and weight words as 16-byte loads (session 23), then word by word in the
    # records kernel (FUSED_A2A_CUDA_META_VEC=0)
    (12, None, META_VEC),
    (24, 8, {"FUSED_A2A_CUDA_META_VEC": "0", "FUSED_A2A_CUDA_RECORDS": "1"}),
    (16, 2, {"FUSED_A2A_CUDA_RECORDS": "1", **OWN_ROWS["senders"]}),
    (8, 1, {"FUSED_A2A_CUDA_SCAN": "tiles"}),
    (24, 8, {"FUSED_A2A_CUDA_RECV_ROWS": "0", "FUSED_A2A_CUDA_SCAN": "tiles"}),
    # A chunk's flag released once its own writes are complete (FUSED_A2A_CUDA_CHUNK_END=lean,
    # session 10): 1-row chunks (every chunk end finds an earlier one pending), own rows by the
    # senders too.
    (8, 1, {"FUSED_A2A_CUDA_CHUNK_END": "lean"}),
    (16, 2, {"FUSED_A2A_CUDA_CHUNK_END": "lean", **OWN_ROWS["senders"]}),
    # Receiver items claimed from a counter, and claimed by the sender warps too once their own
    # items are sent (FUSED_A2A_CUDA_RECV_ITEMS=claim / help, session 11), with both own-row
    # modes and the 16-load copy.
    (24, 8, {"FUSED_A2A_CUDA_RECV_ITEMS": "claim"}),
    (8, 1, {"FUSED_A2A_CUDA_RECV_ITEMS": "claim", **OWN_ROWS["senders"]}),
    (16, 8, {"FUSED_A2A_CUDA_RECV_ITEMS": "help", **OWN_ROWS["senders"]}),
    (24, 2, {"FUSED_A2A_CUDA_RECV_ITEMS": "help", "FUSED_A2A_CUDA_RECV_UNROLL": "16"}),
    # Programmatic dependent launch after the one-block and the two-pass route scan (session 11)
    (24, 8, {"FUSED_A2A_CUDA_PDL": "1"}),
    (8, 1, {"FUSED_A2A_CUDA_PDL": "1", "FUSED_A2A_CUDA_SCAN": "tiles"}),
    # Chunk rows for about 2 / 3 chunks a sender warp (1 by default since session 13; 2 before),
    # dispatch and combine alike
    (24, 8, {"FUSED_A2A_CUDA_CHUNKS_PER_WARP": "2"}),
    (8, 64, {"FUSED_A2A_CUDA_CHUNKS_PER_WARP": "2", **OWN_ROWS["senders"]}),
    (16, 8, {"FUSED_A2A_CUDA_CHUNKS_PER_WARP": "3"}),
    # The route scan's second pass in the combine kernel (the Megatron dispatch here is the
    # dynamic one, which keeps its scan kernels; session 13)
    (24, 8, {"FUSED_A2A_CUDA_SCAN": "fused"}),
    (8, 1, {"FUSED_A2A_CUDA_SCAN": "fused"}),
    # and its first pass (session 25)
    (24, 8, {"FUSED_A2A_CUDA_SCAN": "fused", **PASS1}),
    (8, 1, {"FUSED_A2A_CUDA_SCAN": "fused", **PASS1}),
    # receiver warps pushing rows beside the senders (session 25): 4 and all 12 of a block
    (24, 8, {**META_VEC, **PUSH}),
    (8, 1, {**META_VEC, "FUSED_A2A_CUDA_RECV_PUSH": "12"}),
    # none of them pushing (the default before session 26)
    (24, 8, {**META_VEC, **NO_PUSH}),
    # the combine's sender warps (sessions 27-28; on 2 ranks 3 below 48 SMs, 2 from 48; on more
    # 3 from 48): 48 SMs (with and without weights), then 2 and 4 forced; and EP 2's reducers
    # with 4 vectors a source a step, as on more ranks
    (48, None, {}),
    (24, 8, {"FUSED_A2A_CUDA_COMBINE_SEND_WARPS": "2"}),
    (16, 2, {"FUSED_A2A_CUDA_COMBINE_SEND_WARPS": "4"}),
    (24, 8, {"FUSED_A2A_CUDA_REDUCE": "batch"}),
    # the reducers without / with the L2 prefetch of their next token's rows, and the combine's
    # weights by the lanes / through the rings, forced
    (16, 8, {"FUSED_A2A_CUDA_REDUCE_PREFETCH": "0"}),
    (24, 8, {"FUSED_A2A_CUDA_REDUCE_PREFETCH": "1"}),
    (16, 8, {"FUSED_A2A_CUDA_COMBINE_WEIGHTS": "lanes"}),
    (24, 8, {"FUSED_A2A_CUDA_COMBINE_WEIGHTS": "bulk"}),
)


def _rank_configs(rank, world, device_kind):
    """Fixed inputs through dispatch, combine and both backward passes under every
    DETERMINISM_CONFIGS entry: {config index: [output arrays]}, plus the exactness of
    combine(dispatch(x)) = (ranks reached) * x. device_kind "cpu" runs the same harness on the
    CPU backend (launch knobs ignored there)."""
    import os

    import torch
    import torch.distributed as dist

    import torch_fused_a2a as tfa

    device = torch.device("cuda", rank) if device_kind == "cuda" else torch.device("cpu")
    if device_kind == "cuda":
        torch.cuda.set_device(rank)
    group = dist.group.WORLD
    gen = torch.Generator().manual_seed(77 + rank)
    n, h, e, k = 300, 256, 32, 4
    x = torch.randn(n, h, generator=gen).to(torch.bfloat16).to(device)
    idx = torch.argsort(torch.rand(n, e, generator=gen), dim=1)[:, :k].contiguous()
    idx[torch.rand(n, k, generator=gen) < 0.2] = -1
    idx = idx.to(device)
    w = torch.rand(n, k, generator=gen).to(device)
    owners = torch.where(idx >= 0, idx // (e // world), -1)
    cnt = torch.stack([(owners == g).any(1) for g in range(world)], 1).sum(1)
    expect = ((x.float() * cnt[:, None].float()) + 0.0).to(torch.bfloat16)
    outputs, exact = {}, {}
    for i, (sms, chunk, env) in enumerate(DETERMINISM_CONFIGS):
        knobs = {k for _, _, mode in DETERMINISM_CONFIGS for k in mode}
        for key in ("FUSED_A2A_CUDA_CHUNK_ROWS", *knobs):
            os.environ.pop(key, None)
        if chunk is not None:
            os.environ["FUSED_A2A_CUDA_CHUNK_ROWS"] = str(chunk)
        os.environ.update(env)
        tfa.set_deepep_num_sms(sms)
        xg, wg = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
        rx, ridx, rw, tpe, handle = tfa.fused_dispatch(xg, idx, wg, e, group)
        out, _ = tfa.fused_combine(rx, group, handle)
        gx, gw = torch.autograd.grad(out.float().sum() + rw.sum(), (xg, wg))
        outs = [rx, ridx, rw, tpe, out, gx, gw]
        outputs[i] = [t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy()
                      for t in outs]  # fmt: skip
        exact[i] = bool(torch.equal(out.view(torch.int16), expect.view(torch.int16)))
    tfa.set_deepep_num_sms(24)
    return dict(outputs=outputs, exact=exact)


def _check_configs(per_rank):
    for r, res in enumerate(per_rank):
        assert all(res["exact"].values()), f"rank {r}: combine(dispatch(x)) inexact: {res['exact']}"
        first = res["outputs"][0]
        for i, outs in res["outputs"].items():
            for j, (a, b) in enumerate(zip(outs, first, strict=True)):
                assert np.array_equal(a, b), (
                    f"rank {r}: output {j} under config {DETERMINISM_CONFIGS[i]} differs from "
                    f"config {DETERMINISM_CONFIGS[0]}"
                )


def test_same_bits_across_sm_counts_chunks_and_item_orders():
    """Issue 8: results bitwise identical across num_sms, chunk sizes and the dispatch kernel's
    item orders (and exact), on 2 GPUs."""
    _need(2)
    _check_configs(run_ranks(_rank_configs, 2, "cuda", timeout=300, env=GPU_ENV))


@pytest.mark.parametrize("arena_mb", ["0", "256"], ids=["torch-outputs", "arena"])
def test_stress_1000_random_routings(arena_mb):
    """1,000 iterations by default; FA2A_GPU_STRESS_ITERS=100000 is issue 8's long run. With
    torch's output arena too: every block back in it at the end."""
    g = 4 if gpu_count() >= 4 else 2
    _need(g)
    iters = int(os.environ.get("FA2A_GPU_STRESS_ITERS", "1000"))
    timeout = int(os.environ.get("FA2A_GPU_STRESS_TIMEOUT_S", max(900, iters // 40)))
    env = dict(GPU_ENV, FUSED_A2A_TORCH_ARENA_MB=arena_mb)
    res = run_ranks(_rank_stress, g, iters, 1024, timeout=timeout, env=env)
    report = {r: res[r]["mem"] for r in range(g)}
    print(f"GPU memory before/after {iters} iterations:", json.dumps(report))
    for r in range(g):
        assert res[r]["nbad"] == 0, (
            f"rank {r}: {res[r]['nbad']} bad iterations, first {res[r]['bad']}"
        )
        m = res[r]["mem"]
        assert m["bytes_held_after"] == m["bytes_held_before"], m
        assert m["after"] <= m["before"] + (16 << 20), f"rank {r} GPU memory grew: {m}"
        assert m["rss_after"] <= m["rss_before"] + (64 << 20), f"rank {r} host RSS grew: {m}"
        if arena_mb != "0":
            assert m.get("arena_free_after") == m.get("arena_bytes"), f"rank {r} arena: {m}"


def _rank_graph(rank, world):
    import torch
    import torch.distributed as dist

    import torch_fused_a2a as tfa
    from torch_fused_a2a import _arena

    torch.cuda.set_device(rank)
    n, h, k, e = 128, 1024, 4, 32
    gen = torch.Generator(device="cuda").manual_seed(99 + rank)
    x = torch.randn(n, h, device="cuda", generator=gen).to(torch.bfloat16)
    idx = torch.argsort(torch.rand(n, e, device="cuda", generator=gen), dim=1)[:, :k].contiguous()
    w = torch.rand(n, k, device="cuda", generator=gen)
    buf = tfa.get_buffer(dist.group.WORLD, tfa.get_hidden_bytes(x), x.device)
    ops, cap = torch.ops.fused_a2a, world * n

    def step():
        rx, _, _, _, counts, src, _, stats, _ = ops.dispatch(
            x, None, idx, w, e, buf.group_id, buf.rank, buf.num_ranks, cap, 0
        )
        y = (rx.float() * 2.0).to(rx.dtype)
        out, _ = ops.combine(
            y, None, idx, counts, src, stats, e, n, False, buf.group_id, buf.rank, 0
        )
        return rx, out

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        g_rx, g_out = step()
    mismatches = 0
    for _ in range(5):
        x.copy_(torch.randn(n, h, device="cuda", generator=gen).to(torch.bfloat16))
        graph.replay()
        e_rx, e_out = step()
        torch.cuda.synchronize()
        mismatches += int(not torch.equal(g_rx.view(torch.int16), e_rx.view(torch.int16)))
        mismatches += int(not torch.equal(g_out.view(torch.int16), e_out.view(torch.int16)))
    arena = _arena.find(buf.group_id)
    captured_in_arena = arena is not None and (
        arena.address <= g_rx.data_ptr() < arena.address + arena.size
    )
    return dict(mismatches=mismatches, captured_in_arena=captured_in_arena)


@pytest.mark.parametrize("arena_mb", ["0", "256"], ids=["torch-outputs", "arena"])
def test_cuda_graph_static_path(arena_mb):
    """Also with torch's output arena, where the eager and the captured calls both take recv_x
    from it (the captured one from never-used memory the arena keeps for the graph) and must
    write their rows straight into it (FUSED_A2A_CUDA_DIRECT=require)."""
    g = min(4, gpu_count())
    _need(2)
    env = dict(GPU_ENV, FUSED_A2A_TORCH_ARENA_MB=arena_mb)
    if arena_mb != "0":
        env["FUSED_A2A_CUDA_DIRECT"] = "require"
    res = run_ranks(_rank_graph, g, timeout=300, env=env)
    assert [r["mismatches"] for r in res] == [0] * g, res
    assert [r["captured_in_arena"] for r in res] == [arena_mb != "0"] * g, res


def _rank_timeout(rank, world):
    import torch
    import torch.distributed as dist

    import torch_fused_a2a as tfa

    torch.cuda.set_device(rank)
    x = torch.randn(8, 256, device="cuda").to(torch.bfloat16)
    idx = torch.randint(0, 8, (8, 2), device="cuda")
    tfa.get_buffer(dist.group.WORLD, tfa.get_hidden_bytes(x), x.device)
    if rank == 1:
        time.sleep(12)  # never calls the op
        return None
    start = time.monotonic()
    try:
        tfa.fused_dispatch(x, idx, torch.rand(8, 2, device="cuda"), 8, dist.group.WORLD)
    except Exception as exc:  # noqa: BLE001
        return (type(exc).__name__, str(exc), time.monotonic() - start)
    return ("none", "no error", time.monotonic() - start)


def _rank_record_stream(rank, world):
    """recv_x (an arena block) read on a side stream that is still asleep when recv_x dies and
    the next dispatch takes the same block: with record_stream(side) the next dispatch waits for
    the side stream, so the read sees the first dispatch's rows, not the second's."""
    import torch
    import torch.distributed as dist

    import torch_fused_a2a as tfa
    from torch_fused_a2a import _arena, fused_a2a

    torch.cuda.set_device(rank)
    n, h, k, e = 256, 1024, 4, 16
    gen = torch.Generator(device="cuda").manual_seed(5 + rank)
    x = torch.randn(n, h, device="cuda", generator=gen).to(torch.bfloat16)
    idx = torch.argsort(torch.rand(n, e, device="cuda", generator=gen), 1)[:, :k].contiguous()
    w = torch.rand(n, k, device="cuda", generator=gen)
    group = dist.group.WORLD
    tfa.fused_dispatch(x, idx, w, e, group)  # the exact path once; the next ones speculate
    rx, _, _, _, handle = tfa.fused_dispatch(x, idx, w, e, group)
    arena = _arena.find(fused_a2a._buffer.group_id)
    in_arena = arena is not None and arena.address <= rx.data_ptr() < arena.address + arena.size
    want = rx.clone()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        torch.cuda._sleep(300_000_000)  # ~0.15-0.2 s: the next dispatch is queued long before
        seen = rx.clone()
    rx.record_stream(side)
    address = rx.data_ptr()
    del rx, handle
    rx2, _, _, _, _ = tfa.fused_dispatch(-x, idx, w, e, group)
    same_block = rx2.data_ptr() == address
    torch.cuda.synchronize()
    same = torch.equal(seen.view(torch.int16), want.view(torch.int16))
    return dict(in_arena=in_arena, same_block=same_block, same=same)


def test_record_stream_keeps_an_arena_block_from_reuse():
    """torch's record_stream does nothing for memory outside its allocator; the arena hooks it
    (torch_fused_a2a/_arena.py), so a stream that still reads a dead recv_x holds its block."""
    _need(2)
    res = run_ranks(_rank_record_stream, 2, timeout=180, env=GPU_ENV)
    for r, got in enumerate(res):
        assert got["in_arena"] and got["same_block"], f"rank {r}: the test did not reuse: {got}"
        assert got["same"], f"rank {r}: the side stream read the next dispatch's rows"


def _rank_direct_require(rank, world):
    import torch
    import torch.distributed as dist

    import torch_fused_a2a as tfa

    torch.cuda.set_device(rank)
    x = torch.randn(8, 256, device="cuda").to(torch.bfloat16)
    idx = torch.randint(0, 8, (8, 2), device="cuda")
    # The first dynamic dispatch takes the exact path (no static kernel); the later ones the
    # speculative static kernel, whose direct rows need every rank in this process.
    for _ in range(3):
        try:
            tfa.fused_dispatch(x, idx, torch.rand(8, 2, device="cuda"), 8, dist.group.WORLD)
        except Exception as exc:  # noqa: BLE001
            return str(exc)
    return "no error"


def test_direct_rows_require_fails_for_a_group_across_processes():
    """FUSED_A2A_CUDA_DIRECT=require (the JAX suites' proof that the direct rows ran) is an error
    naming the group size where the ranks are processes (torch) and recv_x is not in an output
    arena (none here; the default has one): no peer has mapped it."""
    _need(2)
    env = dict(
        GPU_ENV,
        FUSED_A2A_CUDA_DIRECT="require",
        FUSED_A2A_TIMEOUT_S="5",
        FUSED_A2A_TORCH_ARENA_MB="0",
    )
    res = run_ranks(_rank_direct_require, 2, timeout=120, env=env)
    for msg in res:
        assert "FUSED_A2A_CUDA_DIRECT=require" in msg and "group of 2 ranks" in msg, msg


def test_timeout_names_op_and_rank():
    _need(2)
    res = run_ranks(_rank_timeout, 2, timeout=120, env=dict(GPU_ENV, FUSED_A2A_TIMEOUT_S="3"))
    name, msg, took = res[0]
    assert "dispatch" in msg and "[1]" in msg, (name, msg)
    assert took < 30, took
