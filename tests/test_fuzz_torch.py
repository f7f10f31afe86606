"""Bad-input fuzz of the torch frontend (issue 8): property-based (hypothesis), bounded in count.

Every call of FusedDispatch / FusedCombine / hybrid_ep_dispatch / hybrid_ep_combine with drawn
shapes, dtypes, routing values, static arguments and memory layouts (non-contiguous, strided,
transposed, offset storage, broadcast) must either match tests/reference.py bit for bit or raise
ValueError / TypeError / RuntimeError - never crash the process, never hang. Stronger than that:
inputs that SEMANTICS.md allows must succeed (non-contiguous ones may instead raise an error that
says "contiguous"), and inputs it forbids must raise on every rank.

Groups of one rank (any input, every check is local) and of two ranks, where rank 0 draws the
case of both ranks and sends it to rank 1: per-rank differences are only those the group must
detect together (a bad topk_idx value on one rank, disagreeing hidden size / top-k / N), so both
ranks always take the same path; buffers are sized up front so that no call needs to grow them.
Each group runs in one child process (tests/mp.py); the example being run is written to a file
first, so a crash names it. FUSED_A2A_FUZZ_SCALE multiplies the example counts (default 1: ~20 s);
FUSED_A2A_FUZZ_SEED=<int> draws other cases than the fixed ones CI runs.
"""

from __future__ import annotations

import os
import traceback

import numpy as np
import reference as R
from fuzz_torch_cases import (
    FLOATS,
    LAYOUTS,
    MAX_H,
    NP_DTYPES,
    VALID_H,
    _judge,
    _outcome,
    _same_path_on_every_rank,
    _values,
    case_tensors,
    check_hybrid,
    draw_hybrid,
    make_tensor,
    rank_hybrid,
    tensor_values,
)
from mp import run_ranks

SCALE = float(os.environ.get("FUSED_A2A_FUZZ_SCALE", "1"))
SEED = os.environ.get("FUSED_A2A_FUZZ_SEED")  # set: random cases from this seed, else fixed ones

NORMAL_DEFECTS = (
    "x_dtype",
    "h",
    "x_ndim",
    "k0",
    "E",
    "idx_dtype",
    "w_dtype",
    "bad_rows",
    "bad_w_cols",
    "bad_value",
    "layout",
    "y_dtype",
    "y_rows",
    "y_layout",
    "y_h",
)


def draw_normal(data, st, num_ranks: int) -> dict:
    """A normal-mode case: a valid one, or a valid one with one defect (half of the cases)."""
    d = data.draw
    x_dtype = d(st.sampled_from(FLOATS), "x dtype")
    y_dtype = d(st.sampled_from(FLOATS), "y dtype")
    h = d(st.sampled_from(VALID_H[x_dtype]), "hidden")
    if (h * NP_DTYPES[y_dtype].itemsize) % 16:
        y_dtype = x_dtype
    lpr = d(st.integers(1, 4), "L")
    case = dict(
        g=num_ranks,
        x_dtype=x_dtype,
        h=[h] * num_ranks,
        e=lpr * num_ranks,
        k=[d(st.integers(1, min(4, lpr * num_ranks)), "K")] * num_ranks,
        idx_dtype=d(st.sampled_from(["int64", "int32"]), "idx dtype"),
        w_dtype=d(st.sampled_from(["fp32", "fp32", "none"]), "weights"),
        seed=d(st.integers(0, 2**31), "seed"),
        x_ndim=2,
        layouts=["contiguous"] * 3,
        ns=[d(st.integers(0, 20), f"N{r}") for r in range(num_ranks)],
        bad_rows=0,
        bad_w_cols=0,
        bad_value=[None] * num_ranks,
        duplicates=d(st.sampled_from([False] * 4 + [True]), "duplicate experts"),
        special=d(st.booleans(), "inf/-0.0 values"),
        y_dtype=y_dtype,
        y_layout="contiguous",
        y_rows=0,
        y_h=h,
    )
    defect = d(st.sampled_from((None,) * len(NORMAL_DEFECTS) + NORMAL_DEFECTS), "defect")
    case["defect"] = defect
    if defect == "x_dtype":
        case["x_dtype"] = d(st.sampled_from(["fp64", "int32", "e4m3", "bool"]), "bad x dtype")
    elif defect == "h":
        case["h"] = [d(st.sampled_from([1, 3, 7, 9]), "bad hidden")] * num_ranks
    elif defect == "x_ndim":
        case["x_ndim"] = d(st.sampled_from([1, 3]), "x ndim")
    elif defect == "k0":
        case["k"] = [0] * num_ranks
    elif defect == "E":
        case["e"] += d(st.sampled_from([1, -case["e"]] if num_ranks > 1 else [-case["e"]]), "dE")
    elif defect == "idx_dtype":
        case["idx_dtype"] = d(st.sampled_from(["fp32", "int16", "uint8"]), "bad idx dtype")
    elif defect == "w_dtype":
        case["w_dtype"] = d(st.sampled_from(["bf16", "fp64"]), "bad weights dtype")
    elif defect == "bad_rows":
        case["bad_rows"] = d(st.sampled_from([-1, 1]), "idx rows offset")
    elif defect == "bad_w_cols":
        case["bad_w_cols"], case["w_dtype"] = 1, "fp32"
    elif defect == "bad_value":  # on one rank only: the group must fail together
        r = d(st.integers(0, num_ranks - 1), "bad rank")
        case["bad_value"][r] = d(st.sampled_from([-2, "E", 2**31 - 1, -(2**40)]), "bad value")
        case["ns"][r] = max(case["ns"][r], 1)
        if case["bad_value"][r] == -(2**40):
            case["idx_dtype"] = "int64"
    elif defect == "layout":
        case["layouts"] = [d(st.sampled_from(LAYOUTS), f"layout {i}") for i in range(3)]
    elif defect == "y_dtype":
        case["y_dtype"] = d(st.sampled_from(["fp64", "int32"]), "bad y dtype")
    elif defect == "y_rows":
        case["y_rows"] = d(st.sampled_from([-1, 1]), "y rows offset")
    elif defect == "y_layout":
        case["y_layout"] = d(st.sampled_from(LAYOUTS), "y layout")
    elif defect == "y_h":
        case["y_h"] = d(st.sampled_from([1, 3, 2 * h]), "y hidden")
    if num_ranks > 1:
        _same_path_on_every_rank(case)
    if num_ranks > 1 and defect is None and d(st.sampled_from([False] * 4 + [True]), "disagree"):
        what = d(st.sampled_from(["h", "k"]), "disagreement")
        other = [8, 16, 32] if what == "h" else list(range(1, min(4, case["e"]) + 1))
        case[what][1] = d(st.sampled_from(other), "other")
        case["defect"] = f"{what} differs"
    return case


def normal_arrays(case, rank):
    rng = np.random.default_rng([case["seed"], rank])
    n, h, k, e = case["ns"][rank], case["h"][rank], case["k"][rank], case["e"]
    shape = {1: (n * h,), 2: (n, h), 3: (n, 1, h)}[case["x_ndim"]]
    x = _values(rng, shape, case["x_dtype"], case["special"])
    if case["duplicates"] or k > e:
        idx = rng.integers(-1, e, (n, k))
    else:
        idx = np.argsort(rng.random((n, e)), axis=1)[:, :k]
        idx[rng.random((n, k)) < 0.2] = -1
    bad = case["bad_value"][rank]
    if bad is not None and idx.size:
        idx.reshape(-1)[rng.integers(0, idx.size)] = e if bad == "E" else bad
    idx = idx[: max(0, n + case["bad_rows"])] if case["bad_rows"] < 0 else idx
    if case["bad_rows"] > 0:
        idx = np.concatenate([idx, np.zeros((1, k), idx.dtype)])
    idx = idx.astype(NP_DTYPES[case["idx_dtype"]])
    w = None
    if case["w_dtype"] != "none":
        w = _values(rng, (idx.shape[0], k + case["bad_w_cols"]), case["w_dtype"], False)
        w = np.abs(w)
    return x, idx, w


def normal_valid(case, arrays) -> bool | None:
    """True: SEMANTICS.md allows it on every rank; False: it forbids it; None: either way."""
    g, e = case["g"], case["e"]
    if case["x_dtype"] not in FLOATS or case["x_ndim"] != 2 or e < 1 or e % g:
        return False
    if case["idx_dtype"] not in ("int32", "int64") or case["w_dtype"] in ("bf16", "fp64"):
        return False
    if len(set(case["h"])) > 1 or len(set(case["k"])) > 1:
        return False
    for r, (x, idx, w) in enumerate(arrays):
        if (case["h"][r] * NP_DTYPES[case["x_dtype"]].itemsize) % 16:
            return False
        if idx.shape[0] != x.shape[0] or (w is not None and w.shape != idx.shape):
            return False  # (a defect that an empty rank does not show is no defect there)
        if idx.size and (idx.min() < -1 or idx.max() >= e):
            return False
    if case["k"][0] == 0:
        return None  # no routing columns: SEMANTICS.md is silent
    return True


# ----------------------------------------------------------------------------- normal mode


def rank_normal(torch, tfa, group, rank, case):
    from torch_utils import to_numpy

    arrays = normal_arrays(case, rank)
    (xt, it, wt), out = case_tensors(torch, arrays, case["layouts"], ("x", "idx", "w"))
    res = _outcome(lambda: tfa.FusedDispatch.apply(xt, it, wt, case["e"], group))
    if res[0] == "error":
        out["dispatch"] = res
        return out
    recv_x, recv_idx, recv_w, tpe, handle = res[1]
    out["dispatch"] = (
        "ok",
        dict(
            recv_x=to_numpy(recv_x),
            recv_idx=to_numpy(recv_idx),
            recv_w=None if recv_w is None else to_numpy(recv_w),
            tpe=to_numpy(tpe),
        ),
    )
    rng = np.random.default_rng([case["seed"], rank, 7])
    rows = recv_x.shape[0] + case["y_rows"]
    y = _values(rng, (max(rows, 0), case["y_h"]), case["y_dtype"], case["special"])
    yt = make_tensor(torch, y, case["y_layout"])
    out["y"], out["y_contiguous"] = tensor_values(yt), yt.is_contiguous()
    out["y_extra_rows"] = y.shape[0] - recv_x.shape[0]
    comb = _outcome(lambda: tfa.FusedCombine.apply(yt, group, handle))
    out["combine"] = comb if comb[0] == "error" else ("ok", to_numpy(comb[1][0]))
    return out


def check_normal(case, outs):
    arrays = [(o["x"], o["idx"], o["w"]) for o in outs]
    valid = normal_valid(case, arrays)
    contiguous = all(o["contiguous"] for o in outs)
    if not _judge([o["dispatch"] for o in outs], valid, contiguous, "FusedDispatch"):
        return
    xs, idxs, ws = (list(a) for a in zip(*arrays, strict=True))
    disp = R.dispatch(xs, idxs, None if ws[0] is None else ws, case["e"])
    for r, o in enumerate(outs):
        got, exp = o["dispatch"][1], disp[r]
        R.assert_bitwise_equal(got["recv_x"], exp["recv_x"], f"rank {r} recv_x")
        R.assert_bitwise_equal(got["recv_idx"], exp["recv_topk_idx"], f"rank {r} recv_topk_idx")
        if ws[0] is not None:
            R.assert_bitwise_equal(got["recv_w"], exp["recv_topk_weights"], f"rank {r} recv_w")
        R.assert_bitwise_equal(got["tpe"], exp["tokens_per_expert"], f"rank {r} tokens/expert")
    extra = {o["y_extra_rows"] for o in outs}
    y_valid = case["y_dtype"] in FLOATS and extra == {0}
    y_valid = y_valid and (case["y_h"] * NP_DTYPES[case["y_dtype"]].itemsize) % 16 == 0
    if y_valid is False and case["y_dtype"] in FLOATS and min(extra) >= 0:
        y_valid = None if (case["y_h"] * NP_DTYPES[case["y_dtype"]].itemsize) % 16 == 0 else False
    y_contiguous = all(o["y_contiguous"] for o in outs)
    if not _judge([o["combine"] for o in outs], y_valid, y_contiguous, "FusedCombine"):
        return
    ys = [o["y"][: disp[r]["num_recv"]] for r, o in enumerate(outs)]
    exp_outs, _ = R.combine(ys, disp, [x.shape[0] for x in xs])
    for r, o in enumerate(outs):
        R.assert_bitwise_equal(o["combine"][1], exp_outs[r], f"rank {r} combine")


# ----------------------------------------------------------------------------- drivers


def _rank_fuzz(rank, world, mode, max_examples, log_path):
    import torch
    import torch.distributed as dist
    from hypothesis import HealthCheck, Phase, given, seed, settings
    from hypothesis import strategies as st

    import torch_fused_a2a as tfa

    torch.set_num_threads(1)
    group = dist.group.WORLD
    draw, run, check = {
        "normal": (draw_normal, rank_normal, check_normal),
        "hybrid": (draw_hybrid, rank_hybrid, check_hybrid),
    }[mode]
    # Sized up front for every case (widest row: 64 x f32; 4 local experts), so that no call
    # grows a buffer (growth is collective, and the ranks may disagree on the need).
    tfa.get_buffer(group, MAX_H * 4)
    tfa.init_hybrid_ep_buffer(group, 2 * MAX_H, 256, 4, 24, 24, False)

    def run_case(case):
        if world == 1:
            return [run(torch, tfa, group, 0, case)]
        mine = run(torch, tfa, group, rank, case)
        outs = [None] * world
        dist.all_gather_object(outs, mine)
        return outs

    if rank != 0:  # follow rank 0's cases until it says stop
        while True:
            box = [None]
            dist.broadcast_object_list(box, src=0)
            if box[0] is None:
                return None
            run_case(box[0])

    failures = []  # the first failing case (no shrinking, no replay: ranks stay in step)
    stats: dict[str, int] = {}

    @settings(
        max_examples=max_examples,
        deadline=None,
        derandomize=SEED is None,
        database=None,
        phases=[Phase.generate],
        suppress_health_check=list(HealthCheck),
        print_blob=False,
    )
    @given(st.data())
    @seed(int(SEED or 0))
    def fuzz(data):
        case = draw(data, st, world)
        if failures:
            return
        with open(log_path, "w") as f:
            f.write(repr(case))
        if world > 1:
            dist.broadcast_object_list([case], src=0)
        try:
            outs = run_case(case)
            check(case, outs)
            for step in ("dispatch", "combine"):
                kind = outs[0].get(step, ("skipped",))[0]
                stats[f"{step} {kind}"] = stats.get(f"{step} {kind}", 0) + 1
        except Exception as exc:  # noqa: BLE001
            failures.append(
                f"{type(exc).__name__}: {exc}\ncase: {case!r}\n{traceback.format_exc()[-3000:]}"
            )

    try:
        fuzz()
    finally:
        if world > 1:
            dist.broadcast_object_list([None], src=0)
    assert not failures, failures[0]
    return stats


def _fuzz(mode, world, examples, tmp_path):
    log = tmp_path / "case.txt"
    n = max(1, int(examples * SCALE))
    env = {"FUSED_A2A_TIMEOUT_S": "20", "FUSED_A2A_BUFFER_ROWS": "3"}
    try:
        res = run_ranks(_rank_fuzz, world, mode, n, str(log), timeout=300 * max(1, SCALE), env=env)
    except AssertionError as exc:
        last = log.read_text() if log.exists() else "?"
        raise AssertionError(f"{exc}\n\nlast case run:\n{last}") from None
    print(f"\nfuzz {mode}, {world} rank(s), {n} cases: {dict(sorted(res[0].items()))}")
    # the fuzz reaches both sides of the contract
    assert res[0].get("dispatch ok", 0) >= n // 5 and res[0].get("dispatch error", 0) >= n // 10
    assert res[0].get("combine ok", 0) >= n // 10


def test_fuzz_normal_one_rank(tmp_path):
    _fuzz("normal", 1, 150, tmp_path)


def test_fuzz_hybrid_one_rank(tmp_path):
    _fuzz("hybrid", 1, 120, tmp_path)


def test_fuzz_normal_two_ranks(tmp_path):
    _fuzz("normal", 2, 80, tmp_path)


def test_fuzz_hybrid_two_ranks(tmp_path):
    _fuzz("hybrid", 2, 60, tmp_path)
