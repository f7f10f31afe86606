"""Self-checks of tests/reference.py: hand-computed cases (expected arrays written out) and
properties."""

from __future__ import annotations

import numpy as np
import pytest
import reference as R
from reference import BF16, E4M3, F16, F32, assert_bitwise_equal

I64 = np.int64


def f32(a):
    return np.array(a, dtype=np.float32)


def i64(a):
    return np.array(a, dtype=np.int64)


# A 2-rank, 4-expert (L=2) case, computed by hand in the comments.
#   rank 0: t0 -> experts 0 (r0), 3 (r1); t1 -> 1 (r0); t2 -> nowhere
#   rank 1: t0 -> experts 2 (r1), 1 (r0); t1 -> 3 (r1)
X0 = f32([[1, 2], [3, 4], [5, 6]])
X1 = f32([[10, 20], [30, 40]])
IDX0 = i64([[0, 3], [1, -1], [-1, -1]])
IDX1 = i64([[2, 1], [3, -1]])
W0 = f32([[0.5, 0.25], [1, 7], [7, 7]])  # 7 = weight on a -1 slot: must not travel
W1 = f32([[0.125, 0.75], [2, 9]])


def _dispatch_small(capacity=None, idx_dtype=np.int64):
    idxs = [IDX0.astype(idx_dtype), IDX1.astype(idx_dtype)]
    return R.dispatch([X0, X1], idxs, [W0, W1], 4, capacity=capacity)


def test_layout_hand():
    per_rank, per_expert, in_rank = R.layout(IDX0, 4, 2)
    assert_bitwise_equal(per_rank, np.array([2, 1], np.int32), "per_rank")
    assert_bitwise_equal(per_expert, np.array([1, 1, 0, 1], np.int32), "per_expert")
    assert_bitwise_equal(in_rank, np.array([[1, 1], [1, 0], [0, 0]], bool), "in_rank")
    # two experts of one rank count once for the rank, once each for the experts
    per_rank, per_expert, _ = R.layout(i64([[0, 1], [2, -1]]), 4, 2)
    assert per_rank.tolist() == [1, 1] and per_expert.tolist() == [1, 1, 1, 0]


def test_dispatch_hand():
    r0, r1 = _dispatch_small()
    assert r0["src"] == [(0, 0), (0, 1), (1, 0)]
    assert_bitwise_equal(r0["recv_x"], f32([[1, 2], [3, 4], [10, 20]]), "recv_x0")
    assert_bitwise_equal(r0["recv_topk_idx"], i64([[0, -1], [1, -1], [-1, 1]]), "idx0")
    assert_bitwise_equal(r0["recv_topk_weights"], f32([[0.5, 0], [1, 0], [0, 0.75]]), "w0")
    assert_bitwise_equal(r0["tokens_per_expert"], i64([1, 2]), "tpe0")
    assert r1["src"] == [(0, 0), (1, 0), (1, 1)]
    assert_bitwise_equal(r1["recv_x"], f32([[1, 2], [10, 20], [30, 40]]), "recv_x1")
    assert_bitwise_equal(r1["recv_topk_idx"], i64([[-1, 1], [0, -1], [1, -1]]), "idx1")
    assert_bitwise_equal(r1["recv_topk_weights"], f32([[0, 0.25], [0.125, 0], [2, 0]]), "w1")
    assert_bitwise_equal(r1["tokens_per_expert"], i64([1, 2]), "tpe1")
    for r in (r0, r1):
        assert (r["num_recv"], r["num_kept"], r["num_dropped"]) == (3, 3, 0)


def test_dispatch_int32_indices_keep_dtype():
    for a, b in zip(_dispatch_small(idx_dtype=np.int32), _dispatch_small(), strict=True):
        assert a["recv_topk_idx"].dtype == np.int32
        assert_bitwise_equal(a["recv_topk_idx"].astype(I64), b["recv_topk_idx"], "idx")
        assert_bitwise_equal(a["recv_x"], b["recv_x"], "recv_x")


def test_combine_hand_and_weights():
    disp = _dispatch_small()
    ys = [d["recv_x"] * np.float32(rho + 1) for rho, d in enumerate(disp)]
    ws = [d["recv_topk_weights"] for d in disp]
    outs, cws = R.combine(ys, disp, [3, 2], weights=ws)
    assert_bitwise_equal(outs[0], f32([[3, 6], [3, 4], [0, 0]]), "out0")
    assert_bitwise_equal(outs[1], f32([[30, 60], [60, 80]]), "out1")
    assert_bitwise_equal(cws[0], f32([[0.5, 0.25], [1, 0], [0, 0]]), "cw0")
    assert_bitwise_equal(cws[1], f32([[0.125, 0.75], [2, 0]]), "cw1")
    outs2, none = R.combine(ys, disp, [3, 2])
    assert none is None
    assert_bitwise_equal(outs2[0], outs[0], "out0 without weights")


def test_dispatch_capacity_drop_and_zero_tail():
    r0, r1 = _dispatch_small(capacity=2)
    assert r0["src"] == [(0, 0), (0, 1)] and r1["src"] == [(0, 0), (1, 0)]
    assert (r0["num_recv"], r0["num_kept"], r0["num_dropped"]) == (3, 2, 1)
    assert_bitwise_equal(r0["tokens_per_expert"], i64([1, 1]), "tpe0")
    assert_bitwise_equal(r1["tokens_per_expert"], i64([1, 1]), "tpe1")
    assert_bitwise_equal(r1["recv_x"], f32([[1, 2], [10, 20]]), "recv_x1")
    # combine skips dropped rows: rank 1's t1 only lived in a dropped row -> zeros
    ys = [d["recv_x"] * np.float32(rho + 1) for rho, d in enumerate((r0, r1))]
    outs, _ = R.combine(ys, [r0, r1], [3, 2])
    assert_bitwise_equal(outs[0], f32([[3, 6], [3, 4], [0, 0]]), "out0")
    assert_bitwise_equal(outs[1], f32([[20, 40], [0, 0]]), "out1")

    r0, r1 = _dispatch_small(capacity=5)
    assert_bitwise_equal(r0["recv_x"], f32([[1, 2], [3, 4], [10, 20], [0, 0], [0, 0]]), "x0")
    assert_bitwise_equal(r0["recv_topk_idx"][3:], np.full((2, 2), -1, I64), "idx tail")
    assert_bitwise_equal(r0["recv_topk_weights"][3:], np.zeros((2, 2), F32), "w tail")
    assert (r0["num_recv"], r0["num_kept"], r0["num_dropped"]) == (3, 3, 0)
    r0, _ = _dispatch_small(capacity=0)
    assert r0["recv_x"].shape == (0, 2) and r0["num_dropped"] == 3


def test_dispatch_backward_selects_owner_slot():
    disp = _dispatch_small()
    gx = [f32(np.arange(6).reshape(3, 2)), f32(np.arange(6).reshape(3, 2) + 10)]
    gw = [f32([[-0.0, 2], [3, 4], [5, 6]]), f32([[7, 8], [9, 10], [11, 12]])]
    dx, dw = R.dispatch_backward(gx, gw, disp, [IDX0, IDX1])
    # t0 of rank 0: slot 0 -> rank 0 row 0 slot 0 (-0.0 kept), slot 1 -> rank 1 row 0 slot 1
    assert_bitwise_equal(dw[0], f32([[-0.0, 8], [3, 0], [0, 0]]), "dw0")
    assert_bitwise_equal(dw[1], f32([[9, 6], [11, 0]]), "dw1")
    assert_bitwise_equal(dx[0], f32([[0 + 10, 1 + 11], [2, 3], [0, 0]]), "dx0")
    assert_bitwise_equal(dx[1], f32([[4 + 12, 5 + 13], [14, 15]]), "dx1")
    # dropped rows give +0.0 gradients
    disp = _dispatch_small(capacity=2)
    _, dw = R.dispatch_backward([g[:2] for g in gx], [g[:2] for g in gw], disp, [IDX0, IDX1])
    assert_bitwise_equal(dw[1], f32([[9, 0], [0, 0]]), "dw1 dropped")


def test_combine_backward_is_cached_dispatch():
    disp = _dispatch_small(capacity=4)
    go = [f32([[1, 2], [3, 4], [5, 6]]), f32([[7, 8], [9, 10]])]
    dy = R.combine_backward(go, disp)
    assert_bitwise_equal(dy[0], f32([[1, 2], [3, 4], [7, 8], [0, 0]]), "dy0")
    assert_bitwise_equal(dy[1], f32([[1, 2], [7, 8], [9, 10], [0, 0]]), "dy1")
    gcw = [f32([[1, 2], [3, 4], [5, 6]]), f32([[7, 8], [9, 10]])]
    dw = R.combine_weights_backward(gcw, disp)
    assert_bitwise_equal(dw[1], f32([[1, 2], [7, 8], [9, 10], [0, 0]]), "dw1")


def _one_token_to_three_ranks(vals, dtype):
    """Token 0 of rank 0 goes to experts 0, 1, 2 on ranks 0, 1, 2; y_rho row 0 = vals[rho]."""
    idx = [i64([[0, 1, 2]]), np.zeros((0, 3), I64), np.zeros((0, 3), I64)]
    xs = [np.zeros((1, 1), dtype), np.zeros((0, 1), dtype), np.zeros((0, 1), dtype)]
    disp = R.dispatch(xs, idx, None, 3)
    ys = [np.array([[v]], dtype=np.float32).astype(dtype) for v in vals]
    return R.combine(ys, disp, [1, 0, 0])[0][0]


def test_combine_rounds_once_in_rank_order():
    # bf16 spacing at 1 is 2^-7: stepwise rounding would give 1.0, one rounding 1 + 2^-7
    out = _one_token_to_three_ranks([1.0, 2.0**-8, 2.0**-8], BF16)
    assert_bitwise_equal(out, np.array([[1 + 2.0**-7]], np.float32).astype(BF16), "bf16")
    out = _one_token_to_three_ranks([1.0, 2.0**-11, 2.0**-11], F16)
    assert_bitwise_equal(out, np.array([[1 + 2.0**-10]], F16), "f16")
    # f32: ((0 + 1) + 1e8) - 1e8 = 0 in rank order (1 + 1e8 rounds to 1e8)
    out = _one_token_to_three_ranks([1.0, 1e8, -1e8], F32)
    assert_bitwise_equal(out, f32([[0.0]]), "f32 order")
    # the accumulator starts at +0.0: -0.0 + -0.0 + -0.0 from three ranks gives +0.0
    out = _one_token_to_three_ranks([-0.0, -0.0, -0.0], BF16)
    assert out.view(np.uint16)[0, 0] == 0


def _random_routing(rng, n, k, e, p_none=0.2):
    idx = np.stack([rng.permutation(e)[:k] for _ in range(n)]) if n else np.zeros((0, k), I64)
    idx = idx.astype(I64)
    idx[rng.random((n, k)) < p_none] = -1
    return idx


@pytest.mark.parametrize("g,e,k", [(2, 8, 2), (3, 6, 3), (4, 16, 4)])
def test_round_trip_and_layout_consistency(g, e, k):
    rng = np.random.default_rng(g)
    ns = [int(rng.integers(0, 9)) for _ in range(g)]
    xs = [rng.integers(-8, 8, (n, 5)).astype(np.float32) for n in ns]
    idxs = [_random_routing(rng, n, k, e) for n in ns]
    ws = [rng.random((n, k)).astype(np.float32) for n in ns]
    disp = R.dispatch(xs, idxs, ws, e)
    # layout's counts agree with what dispatch delivers
    per_rank = sum(R.layout(i, e, g)[0].astype(I64) for i in idxs)
    per_expert = sum(R.layout(i, e, g)[1].astype(I64) for i in idxs)
    for r, d in enumerate(disp):
        assert d["num_recv"] == per_rank[r]
        assert_bitwise_equal(d["tokens_per_expert"], per_expert[r * e // g : (r + 1) * e // g], "")
    # identity experts: combine(dispatch(x)) = x * (number of ranks the token reached)
    outs, cws = R.combine(
        [d["recv_x"] for d in disp], disp, ns, [d["recv_topk_weights"] for d in disp]
    )
    for s in range(g):
        reach = R.layout(idxs[s], e, g)[2].sum(axis=1).astype(np.float32)
        assert_bitwise_equal(outs[s], xs[s] * reach[:, None] + np.float32(0), f"out{s}")
        # every owned slot comes back exactly once; -1 slots come back 0
        assert_bitwise_equal(cws[s], np.where(idxs[s] >= 0, ws[s], np.float32(0)), f"cw{s}")
    # a cached dispatch re-places exactly what the dispatch placed
    for a, d in zip(R.combine_backward(xs, disp), disp, strict=True):
        assert_bitwise_equal(a, d["recv_x"], "cached dispatch")


def test_fp8_input_rows_travel_with_scales():
    rng = np.random.default_rng(0)
    xs = [rng.standard_normal((n, 256)).astype(BF16) for n in (3, 2)]
    qs = [R.fp8_quantize(x) for x in xs]
    idxs = [_random_routing(rng, n, 2, 4, 0.0) for n in (3, 2)]
    d8 = R.dispatch(qs, idxs, None, 4)
    d16 = R.dispatch(xs, idxs, None, 4)
    for a, b in zip(d8, d16, strict=True):
        data, scales = a["recv_x"]
        assert data.dtype == E4M3 and scales.shape == (a["num_recv"], 2)
        assert_bitwise_equal(data, R.fp8_quantize(b["recv_x"])[0], "fp8 data")
        assert_bitwise_equal(scales, R.fp8_quantize(b["recv_x"])[1], "fp8 scales")


def test_fp8_formula_hand():
    x = np.zeros((2, 256), np.float32)
    x[0, :4] = [448, 1, -0.5, 3.25]  # block 0: amax 448 -> scale 1, values exact (3.25 -> 3.25)
    x[0, 128:130] = [896, 3]  # block 1: scale 2 -> q = [448, 1.5]
    # row 1: block 0 all zero -> scale f32(1e-4)/448, q 0; block 1 amax 1e-5 < floor
    x[1, 128] = 1e-5
    q, s = R.fp8_quantize(x.astype(BF16))
    assert s.dtype == F32 and s.shape == (2, 2)
    assert_bitwise_equal(s[0], f32([1.0, 2.0]), "scales row 0")
    floor_scale = np.float32(np.float32(1e-4) / np.float32(448))
    assert_bitwise_equal(s[1], f32([floor_scale, floor_scale]), "scales row 1")
    assert_bitwise_equal(q[0, :4], f32([448, 1, -0.5, 3.25]).astype(E4M3), "q block 0")
    assert_bitwise_equal(q[0, 128:130], f32([448, 1.5]).astype(E4M3), "q block 1")
    assert_bitwise_equal(q[1, :128], np.zeros(128, E4M3), "q zero block")
    deq = R.fp8_dequantize(q, s)
    assert_bitwise_equal(deq[0, 128:130], f32([896, 3]), "dequantised")


def test_fp8_round_trip_error_bound():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((16, 512)).astype(np.float32)
    x *= np.float32(10.0) ** rng.integers(-6, 4, (16, 4, 1)).repeat(128, axis=2).reshape(16, 512)
    x[3, :128] = 0
    xb = x.astype(BF16)
    q, s = R.fp8_quantize(xb)
    assert not np.isnan(R.to_f32(q)).any()
    deq = R.fp8_dequantize(q, s)
    xf = R.to_f32(xb)
    # e4m3: 3 mantissa bits (relative error <= 2^-4), subnormal spacing 2^-9 (abs <= 2^-10 * scale)
    bound = (np.abs(xf) * 2.0**-4 + np.repeat(s, 128, axis=1) * 2.0**-10) * (1 + 1e-5)
    assert (np.abs(deq - xf) <= bound).all()
    assert (np.abs(R.to_f32(q)) <= 448).all()


# HybridEP hand case: G=2, L=2 (E=4), N=3. Global tokens g = src*3 + t:
#   g0 -> {0, 3}, g1 -> {1}, g2 -> {}, g3 -> {0, 1}, g4 -> {2}, g5 -> {0, 2}
HX = [f32([[1, 2], [3, 4], [5, 6]]), f32([[7, 8], [9, 10], [11, 12]])]
HROUTES = {0: [0, 3], 1: [1], 2: [], 3: [0, 1], 4: [2], 5: [0, 2]}
HRM = np.zeros((6, 4), bool)
for _g, _es in HROUTES.items():
    HRM[_g, _es] = True
HP = (np.arange(24, dtype=np.float32).reshape(6, 4) + 1) / np.float32(64)  # p[g,e] = (4g+e+1)/64
HRMS, HPS = [HRM[:3], HRM[3:]], [HP[:3], HP[3:]]


def _rows_of(xs_all, tokens):
    return f32([xs_all[t] if t >= 0 else [0, 0] for t in tokens])


def test_hybrid_dispatch_hand():
    xa = np.concatenate(HX)
    r0, r1 = R.hybrid_dispatch(HX, HRMS, HPS, 2)
    assert_bitwise_equal(r0["hidden"], _rows_of(xa, [0, 3, 5, 1, 3]), "hidden0")
    assert_bitwise_equal(r0["probs"], f32([1, 13, 21, 6, 14]) / 64, "probs0")
    assert_bitwise_equal(r0["tokens_per_expert"], i64([3, 2]), "tpe0")
    assert_bitwise_equal(r1["hidden"], _rows_of(xa, [4, 5, 0]), "hidden1")
    assert_bitwise_equal(r1["probs"], f32([19, 23, 4]) / 64, "probs1")
    assert_bitwise_equal(r1["tokens_per_expert"], i64([2, 1]), "tpe1")
    assert r0["scaling_factor"] is None and not r0["overflow"]

    r0, r1 = R.hybrid_dispatch(HX, HRMS, HPS, 2, pad_multiple=2)
    assert_bitwise_equal(r0["hidden"], _rows_of(xa, [0, 3, 5, -1, 1, 3]), "padded hidden0")
    assert_bitwise_equal(r0["probs"], f32([1, 13, 21, 0, 6, 14]) / 64, "padded probs0")
    assert_bitwise_equal(r0["tokens_per_expert"], i64([4, 2]), "padded tpe0")
    assert_bitwise_equal(r1["hidden"], _rows_of(xa, [4, 5, 0, -1]), "padded hidden1")
    assert_bitwise_equal(r1["tokens_per_expert"], i64([2, 2]), "padded tpe1")


def test_hybrid_static_size_overflow_and_tail():
    xa = np.concatenate(HX)
    r0, r1 = R.hybrid_dispatch(HX, HRMS, HPS, 2, pad_multiple=2, num_permuted_tokens=5)
    assert r0["overflow"] and not r1["overflow"]
    assert_bitwise_equal(r0["hidden"], _rows_of(xa, [0, 3, 5, -1, 1]), "hidden0")
    assert_bitwise_equal(r0["tokens_per_expert"], i64([4, 1]), "clipped tpe0")
    assert_bitwise_equal(r1["hidden"], _rows_of(xa, [4, 5, 0, -1, -1]), "hidden1 zero tail")
    assert_bitwise_equal(r1["probs"], f32([19, 23, 4, 0, 0]) / 64, "probs1 zero tail")
    assert_bitwise_equal(r1["tokens_per_expert"], i64([2, 2]), "tpe1")
    r0, r1 = R.hybrid_dispatch(HX, HRMS, HPS, 2, num_permuted_tokens=2)
    assert r0["overflow"] and r0["tokens_per_expert"].tolist() == [2, 0]
    assert r1["overflow"] and r1["tokens_per_expert"].tolist() == [2, 0]
    # combine ignores dropped rows: g0's expert-3 row (on rank 1), g1's only row, g3's expert 1
    disp = [r0, r1]
    outs, cps = R.hybrid_combine([r["hidden"] for r in disp], disp, [r["probs"] for r in disp])
    assert_bitwise_equal(outs[0], f32([[1, 2], [0, 0], [0, 0]]), "out0 dropped")
    assert_bitwise_equal(outs[1], f32([[7, 8], [9, 10], [11, 12]]), "out1 dropped")
    assert cps[0][1, 1] == 0 and cps[1][0, 1] == 0 and cps[1][0, 0] == HP[3, 0]


def test_hybrid_combine_hand():
    disp = R.hybrid_dispatch(HX, HRMS, HPS, 2, pad_multiple=2, num_permuted_tokens=8)
    ys = [d["hidden"] * np.float32(rho + 1) for rho, d in enumerate(disp)]
    outs, cps = R.hybrid_combine(ys, disp, probs=[d["probs"] for d in disp])
    assert_bitwise_equal(outs[0], f32([[3, 6], [3, 4], [0, 0]]), "out0")
    assert_bitwise_equal(outs[1], f32([[14, 16], [18, 20], [33, 36]]), "out1")
    assert_bitwise_equal(np.concatenate(cps), np.where(HRM, HP, np.float32(0)), "combined probs")
    # backward of dispatch = combine of the gradients
    dx, dp = R.hybrid_dispatch_backward(ys, [d["probs"] for d in disp], disp)
    assert_bitwise_equal(dx[1], outs[1], "dx1")
    # backward of combine = cached dispatch, zeros on padding and tail rows
    dy = R.hybrid_combine_backward(HX, disp)
    assert_bitwise_equal(dy[0], disp[0]["hidden"], "dy0")
    assert dy[1].shape == (8, 2) and not dy[1][3:].any()
    dprobs = R.hybrid_combine_probs_backward(cps, disp)
    assert_bitwise_equal(dprobs[0], disp[0]["probs"], "dprobs0")


@pytest.mark.parametrize("dtype,pad", [(F32, None), (F32, 4), (BF16, 8)])
def test_hybrid_megatron_dropless_round_trip(dtype, pad):
    """permute -> multiply rows by their prob -> unpermute == x * sum of routed probs."""
    rng = np.random.default_rng(7)
    g, lpr, n, k, h = 3, 2, 5, 3, 8
    e = g * lpr
    xs = [rng.integers(-8, 8, (n, h)).astype(np.float32).astype(dtype) for _ in range(g)]
    rms = [np.zeros((n, e), bool) for _ in range(g)]
    for rm in rms:
        for t in range(n):
            rm[t, rng.permutation(e)[: rng.integers(0, k + 1)]] = True
    ps = [(rng.integers(1, 16, (n, e)) / 16).astype(np.float32) for _ in range(g)]
    disp = R.hybrid_dispatch(xs, rms, ps, lpr, pad_multiple=pad)
    ys = [(R.to_f32(d["hidden"]) * d["probs"][:, None]).astype(dtype) for d in disp]
    outs, _ = R.hybrid_combine(ys, disp)
    for s in range(g):
        kept = np.where(rms[s], ps[s], np.float32(0)).sum(axis=1, dtype=np.float32)
        # small integers times sixteenths: every product and f32 sum is exact, so the one
        # rounding of combine equals rounding the exact x * sum(p) once
        expect = (R.to_f32(xs[s]) * kept[:, None] + np.float32(0)).astype(dtype)  # +0.0, not -0.0
        assert_bitwise_equal(outs[s], expect, f"out{s}")


def test_hybrid_fp8_dispatch():
    rng = np.random.default_rng(3)
    xs = [rng.standard_normal((4, 256)).astype(BF16) for _ in range(2)]
    rms = [rng.random((4, 4)) < 0.5 for _ in range(2)]
    disp = R.hybrid_dispatch(xs, rms, None, 2, pad_multiple=4, fp8=True)
    q_all, s_all = R.fp8_quantize(np.concatenate(xs))
    for d in disp:
        hd = d["handle"]
        real = hd["row_token"] >= 0
        assert d["hidden"].dtype == E4M3 and d["probs"] is None
        assert_bitwise_equal(d["hidden"][real], q_all[hd["row_token"][real]], "fp8 rows")
        assert_bitwise_equal(d["scaling_factor"][real], s_all[hd["row_token"][real]], "scales")
        assert not d["scaling_factor"][~real].any()
        assert not R.to_f32(d["hidden"][~real]).any()


def test_assert_bitwise_equal_messages():
    with pytest.raises(AssertionError, match=r"z: 1 of 3 elements differ bitwise; first at index"):
        assert_bitwise_equal(f32([1, 0.0, 2]), f32([1, -0.0, 2]), "z")
    with pytest.raises(AssertionError, match=r"index \(1, 0\).*0x3f80"):
        assert_bitwise_equal(np.array([[0], [2]], BF16), np.array([[0], [1]], BF16), "b")
    with pytest.raises(AssertionError, match="dtype"):
        assert_bitwise_equal(f32([1]), np.array([1], F16), "d")
    with pytest.raises(AssertionError, match="shape"):
        assert_bitwise_equal(f32([1]), f32([1, 1]), "s")
    nan = f32([np.nan])
    assert_bitwise_equal(nan, nan.copy(), "same nan")
    with pytest.raises(AssertionError):
        assert_bitwise_equal(nan, -nan, "nan sign")


def test_reference_rejects_bad_input():
    with pytest.raises(ValueError, match="num_experts=5"):
        R.dispatch([X0, X1], [IDX0, IDX1], None, 5)
    with pytest.raises(ValueError, match=r"\[-1, 4\)"):
        R.dispatch([X0, X1], [IDX0 - 1, IDX1], None, 4)
    with pytest.raises(TypeError):
        R.dispatch([X0.astype(np.int32), X1], [IDX0, IDX1], None, 4)
