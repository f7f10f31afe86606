"""Stress (issue 8): 10,000 iterations of random sizes on the CPU backend, exact results throughout,
flat host RSS, buffer growth logged.

- `test_stress_threads`: ranks are threads of this process calling the core directly
  (tests/raw_core.py), groups of 1-4 ranks used in random order; every iteration draws N per rank,
  H, dtype, K, L, routing and capacity, runs normal dispatch + combine (weighted or not, static or
  exact size, cached re-dispatch) or HybridEP dispatch + combine, and checks every output bit for
  bit (a vectorised form of tests/reference.py, and the reference itself every 25th iteration).
  Buffers start small (FUSED_A2A_BUFFER_ROWS-style: a few rows per round, so most ops take several
  rounds) and grow when a wider row comes; every growth is logged. RSS is sampled after warm-up and
  at the end.
- `test_stress_torch_ranks`: the same on 2 real processes through the torch frontend (shared
  memory transport, get_buffer growth), fewer iterations.

Set FUSED_A2A_STRESS_ITERS to change the iteration count (default 10,000). Expected run time:
~15-30 s for the threads, ~10 s for the processes, on 2 cores.
"""

from __future__ import annotations

import gc
import os
import time

import numpy as np
import raw_core as rc
import reference as R
from mp import run_ranks
from reference import assert_bitwise_equal

import fused_a2a_core as core

ITERATIONS = int(os.environ.get("FUSED_A2A_STRESS_ITERS", "10000"))
ROWS_PER_ROUND = 4  # small slots: most ops take several rounds
RSS_SLACK_BYTES = 24 << 20
DTYPES = {"bf16": rc.BF16, "fp16": np.dtype(np.float16), "fp32": np.dtype(np.float32)}
HIDDEN = {"bf16": (8, 16, 24, 64, 200), "fp16": (8, 32, 136), "fp32": (4, 12, 64, 100)}


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


# ----------------------------------------------------------------------------- inputs


def draw_case(rng, num_ranks: int, max_tokens: int = 40) -> dict:
    dname = str(rng.choice(list(DTYPES)))
    h = int(rng.choice(HIDDEN[dname]))
    num_local = int(rng.integers(1, 4))
    e = num_ranks * num_local
    k = int(rng.integers(1, min(e, 4) + 1))
    ns = [
        0 if rng.random() < 0.1 else int(rng.integers(0, max_tokens + 1)) for _ in range(num_ranks)
    ]
    dtype = DTYPES[dname]
    xs, idxs, ws = [], [], []
    for n in ns:
        xs.append(rng.standard_normal((n, h), dtype=np.float32).astype(dtype))
        idx = np.argsort(rng.random((n, e)), axis=1)[:, :k].astype(rng.choice([np.int32, np.int64]))
        idx[rng.random((n, k)) < 0.2] = -1
        idxs.append(np.ascontiguousarray(idx))
        ws.append(rng.random((n, k), dtype=np.float32))
    return dict(dtype=dtype, h=h, num_local=num_local, e=e, k=k, ns=ns, xs=xs, idxs=idxs, ws=ws)


# ----------------------------------------------------------------------------- expectations


def expect_dispatch(xs, idxs, ws, e, capacity=None):
    """Vectorised normal-mode dispatch of every rank (same contract as reference.dispatch)."""
    g = len(xs)
    lpr = e // g
    out = []
    for r in range(g):
        parts = []
        for s in range(g):
            own = (idxs[s] >= 0) & (idxs[s] // lpr == r)
            rows = np.nonzero(own.any(axis=1))[0]
            o = own[rows]
            parts.append(
                (
                    s,
                    rows,
                    xs[s][rows],
                    np.where(o, idxs[s][rows] - r * lpr, -1),
                    np.where(o, ws[s][rows], np.float32(0)),
                )
            )
        num_recv = sum(len(p[1]) for p in parts)
        cap = num_recv if capacity is None else capacity
        kept = min(cap, num_recv)
        h, k = xs[0].shape[1], idxs[0].shape[1]
        recv_x = np.zeros((cap, h), xs[0].dtype)
        recv_i = np.full((cap, k), -1, np.int64)
        recv_w = np.zeros((cap, k), np.float32)
        src = np.concatenate([np.full(len(p[1]), p[0]) for p in parts])[:kept]
        tok = np.concatenate([p[1] for p in parts])[:kept]
        recv_x[:kept] = np.concatenate([p[2] for p in parts])[:kept]
        recv_i[:kept] = np.concatenate([p[3] for p in parts])[:kept]
        recv_w[:kept] = np.concatenate([p[4] for p in parts])[:kept]
        tpe = np.bincount(recv_i[recv_i >= 0], minlength=lpr).astype(np.int64)
        out.append(dict(recv_x=recv_x, recv_i=recv_i, recv_w=recv_w, tpe=tpe, src=src, tok=tok))
    return out


def expect_combine(ys, exp, ns, weights=None):
    """out[s][t] = sum over r ascending of ys[r][row of (s,t)], f32 from +0.0, one rounding."""
    g = len(ys)
    outs, out_ws = [], []
    for s in range(g):
        acc = np.zeros((ns[s], ys[0].shape[1]), np.float32)
        wacc = None if weights is None else np.zeros((ns[s], weights[0].shape[1]), np.float32)
        for r in range(g):
            sel = np.nonzero(exp[r]["src"] == s)[0]
            acc[exp[r]["tok"][sel]] += R.to_f32(ys[r][sel])
            if weights is not None:
                wacc[exp[r]["tok"][sel]] += weights[r][sel]
        outs.append(R.round_to(ys[0].dtype, acc))
        out_ws.append(wacc)
    return outs, out_ws


# ----------------------------------------------------------------------------- one iteration


def normal_iteration(tg, rng, case, full_check: bool):
    g, e, ns = tg.num_ranks, case["e"], case["ns"]
    xs, idxs, ws = case["xs"], case["idxs"], case["ws"]
    static = rng.random() < 0.3
    cap = int(rng.integers(0, sum(ns) + 2)) if static else None
    weighted = rng.random() < 0.5
    cached = rng.random() < 0.3
    ys = [None] * g
    cws = [None] * g
    gouts = [
        rng.standard_normal((n, case["h"]), dtype=np.float32).astype(case["dtype"]) for n in ns
    ]

    def rank_fn(r):
        d = rc.dispatch(tg.gid, r, g, xs[r], idxs[r], ws[r], e, capacity=cap)
        c = d["recv_x"].shape[0]
        ys[r] = np.random.default_rng([r, c]).standard_normal((c, case["h"]), dtype=np.float32)
        ys[r] = ys[r].astype(case["dtype"])
        cws[r] = d["recv_topk_weights"] if weighted else None
        out, out_w = rc.combine(tg.gid, r, ys[r], d["handle"], cws[r])
        again = rc.cached_dispatch(tg.gid, r, gouts[r], d["handle"]) if cached else None
        return d, out, out_w, again

    res = tg.run(rank_fn)
    exp = expect_dispatch(xs, idxs, ws, e, cap)
    outs, out_ws = expect_combine(ys, exp, ns, cws if weighted else None)
    again_exp = expect_dispatch(gouts, idxs, ws, e, cap) if cached else None
    for r, (d, out, out_w, again) in enumerate(res):
        assert_bitwise_equal(d["recv_x"], exp[r]["recv_x"], f"rank {r} recv_x")
        assert_bitwise_equal(d["recv_topk_idx"].astype(np.int64), exp[r]["recv_i"], f"rank {r} idx")
        assert_bitwise_equal(d["recv_topk_weights"], exp[r]["recv_w"], f"rank {r} weights")
        assert_bitwise_equal(d["tokens_per_expert"], exp[r]["tpe"], f"rank {r} tokens_per_expert")
        assert_bitwise_equal(out, outs[r], f"rank {r} combine")
        if weighted:
            assert_bitwise_equal(out_w, out_ws[r], f"rank {r} combined weights")
        if cached:
            assert_bitwise_equal(again, again_exp[r]["recv_x"], f"rank {r} cached dispatch")
    if full_check:  # the vectorised expectation agrees with the reference itself
        ref = R.dispatch(xs, idxs, ws, e, capacity=cap)
        ref_outs, _ = R.combine(ys, ref, ns)
        for r, (d, out, _, _) in enumerate(res):
            assert_bitwise_equal(d["recv_x"], ref[r]["recv_x"], f"rank {r} recv_x (reference)")
            assert_bitwise_equal(out, ref_outs[r], f"rank {r} combine (reference)")


def hybrid_iteration(tg, rng, case):
    g, lpr, h = tg.num_ranks, case["num_local"], case["h"]
    n = case["ns"][0]
    xs = [rng.standard_normal((n, h), dtype=np.float32).astype(case["dtype"]) for _ in range(g)]
    rmaps = [rng.random((n, g * lpr)) < rng.uniform(0.1, 0.7) for _ in range(g)]
    probs = [rng.random((n, g * lpr), dtype=np.float32) for _ in range(g)]
    pad = int(rng.choice([0, 0, 4, 16]))
    num_rows = None if rng.random() < 0.5 else int(rng.integers(0, 2 * n * lpr + 2))
    ref = R.hybrid_dispatch(xs, rmaps, probs, lpr, pad or None, num_rows)

    def rank_fn(r):
        d = rc.hybrid_dispatch(tg.gid, r, g, xs[r], rmaps[r], probs[r], lpr, pad, num_rows)
        out, out_p = rc.hybrid_combine(tg.gid, r, d["hidden"], d["handle"], d["probs"])
        return d, out, out_p

    res = tg.run(rank_fn)
    outs, cps = R.hybrid_combine(
        [d["hidden"] for d, _, _ in res], ref, [d["probs"] for d, _, _ in res]
    )
    for r, (d, out, out_p) in enumerate(res):
        assert_bitwise_equal(d["hidden"], ref[r]["hidden"], f"rank {r} hybrid hidden")
        assert_bitwise_equal(d["probs"], ref[r]["probs"], f"rank {r} hybrid probs")
        assert_bitwise_equal(d["tokens_per_expert"], ref[r]["tokens_per_expert"], f"rank {r} tpe")
        assert_bitwise_equal(out, outs[r], f"rank {r} hybrid combine")
        assert_bitwise_equal(out_p, cps[r], f"rank {r} hybrid combined probs")


# ----------------------------------------------------------------------------- tests


def _needed_bytes(g, case) -> int:
    itemsize = case["dtype"].itemsize
    normal = core.recommended_buffer_bytes(case["h"] * max(itemsize, 2), g, 0, ROWS_PER_ROUND)
    hybrid = core.hybrid_buffer_bytes(case["h"], itemsize, case["num_local"], g, 0, ROWS_PER_ROUND)
    return max(normal, hybrid)


def test_stress_threads():
    groups: dict[int, rc.ThreadGroup] = {}
    growth_log: list[str] = []
    held_before = core.buffer_bytes_held()
    rss_warm = None
    start = time.monotonic()
    counts = {"normal": 0, "hybrid": 0}
    try:
        for it in range(ITERATIONS):
            rng = np.random.default_rng([8, it])
            g = int(rng.choice([1, 2, 2, 3, 3, 4]))
            case = draw_case(rng, g)
            need = _needed_bytes(g, case)
            tg = groups.get(g)
            if tg is None or tg.data_bytes < need:
                size = need if tg is None else max(need, 2 * tg.data_bytes)
                growth_log.append(
                    f"iteration {it}: group of {g} ranks: buffer "
                    f"{0 if tg is None else tg.data_bytes} -> {size} bytes "
                    f"(hidden {case['h']} {case['dtype']}, {case['num_local']} local experts)"
                )
                if tg is not None:
                    tg.release()
                groups[g] = tg = rc.ThreadGroup(g, size)
            if rng.random() < 0.2:
                hybrid_iteration(tg, rng, case)
                counts["hybrid"] += 1
            else:
                normal_iteration(tg, rng, case, full_check=it % 25 == 0)
                counts["normal"] += 1
            if it == min(1000, ITERATIONS // 2):
                gc.collect()
                rss_warm = rss_bytes()
        gc.collect()
        rss_end = rss_bytes()
        held = core.buffer_bytes_held() - held_before
        expected_held = sum(t.num_ranks * (t.data_bytes + 64 * 1024) for t in groups.values())
    finally:
        for t in groups.values():
            t.release()
    elapsed = time.monotonic() - start
    mib = 2**20
    print(
        f"\nstress (threads): {ITERATIONS} iterations ({counts}) in {elapsed:.1f} s; "
        f"RSS {rss_warm / mib:.1f} MiB after warm-up, {rss_end / mib:.1f} MiB at the end"
    )
    print("buffer growth:\n  " + "\n  ".join(growth_log))
    assert held == expected_held, f"the registry holds {held} bytes, the groups {expected_held}"
    assert rss_end - rss_warm < RSS_SLACK_BYTES, (
        f"host RSS grew by {(rss_end - rss_warm) / 2**20:.1f} MiB over the iterations after "
        f"warm-up (limit {RSS_SLACK_BYTES >> 20} MiB)"
    )
    assert core.buffer_bytes_held() == held_before


# ----------------------------------------------------------------------------- torch ranks


def _rank_torch_stress(rank, world, iterations):
    import torch
    import torch.distributed as dist
    from torch_utils import from_numpy, to_numpy

    import torch_fused_a2a as tfa
    from torch_fused_a2a import fused_a2a as module  # holds the module global _buffer

    torch.set_num_threads(1)
    group = dist.group.WORLD
    growth, rss, buffer = [], [], None
    for it in range(iterations):
        rng = np.random.default_rng([9, it])
        case = draw_case(rng, world, max_tokens=64)
        x, idx, w = (from_numpy(case[k][rank]) for k in ("xs", "idxs", "ws"))
        recv_x, recv_idx, recv_w, tpe, handle = tfa.FusedDispatch.apply(x, idx, w, case["e"], group)
        if module._buffer is not buffer:
            buffer = module._buffer
            growth.append((it, buffer.num_nvl_bytes))
        out, _ = tfa.FusedCombine.apply(recv_x, group, handle)
        exp = expect_dispatch(case["xs"], case["idxs"], case["ws"], case["e"])
        outs, _ = expect_combine([e["recv_x"] for e in exp], exp, case["ns"])
        assert_bitwise_equal(to_numpy(recv_x), exp[rank]["recv_x"], f"iteration {it} recv_x")
        assert_bitwise_equal(to_numpy(recv_idx).astype(np.int64), exp[rank]["recv_i"], "idx")
        assert_bitwise_equal(to_numpy(recv_w), exp[rank]["recv_w"], f"iteration {it} recv_w")
        assert_bitwise_equal(to_numpy(tpe), exp[rank]["tpe"], f"iteration {it} tpe")
        assert_bitwise_equal(to_numpy(out), outs[rank], f"iteration {it} combine")
        if it in (iterations // 4, iterations - 1):
            gc.collect()
            rss.append(rss_bytes())
    return growth, rss


def test_stress_torch_ranks():
    iterations = max(50, ITERATIONS // 25)
    start = time.monotonic()
    res = run_ranks(_rank_torch_stress, 2, iterations, timeout=300)
    elapsed = time.monotonic() - start
    for rank, (growth, rss) in enumerate(res):
        print(
            f"\nstress (torch rank {rank}): {iterations} iterations in {elapsed:.1f} s; buffer "
            f"(re)created at (iteration, bytes) {growth}; RSS {[r >> 20 for r in rss]} MiB"
        )
        sizes = [b for _, b in growth]
        assert sizes == sorted(sizes), f"rank {rank}: the buffer shrank: {growth}"
        assert rss[-1] - rss[0] < RSS_SLACK_BYTES, f"rank {rank}: RSS grew: {rss}"
