"""torch_fused_a2a HybridEP mode (SEMANTICS.md section 2) on real gloo ranks, bit for bit.

Every case runs HybridEPDispatch (permute) -> HybridEPCombine (unpermute) with backward on G = 2, 3,
4 processes (tests/mp.py) and compares the permuted rows, probs, FP8 scales, tokens_per_expert,
the row map, padding rows, the overflow flag, the combined output, dy (combine backward = cached
re-dispatch), x.grad and probs.grad with tests/reference.py, bitwise; plus the Megatron-style
dropless round trip (permute, multiply by probs, unpermute == x times the sum of kept probs) and
the FP8 padding check (every expert count a multiple of 16 with pad_multiple=16).

All cases of one group size share one spawn (one process group, one HybridEP buffer); the buffer
carries FUSED_A2A_BUFFER_ROWS=8 tokens per round, so most cases take several rounds. A module
cache runs each spawn once and the parametrised tests read from it. About 1 minute on 2 cores.
"""

from __future__ import annotations

import functools
import re
import traceback
from typing import NamedTuple

import ml_dtypes
import numpy as np
import pytest
import reference as R
import torch
from mp import run_once, run_ranks
from reference import assert_bitwise_equal
from torch_utils import DTYPES, assert_same_routes, counted_applies, from_numpy, to_numpy

E4M3 = np.dtype(ml_dtypes.float8_e4m3fn)
ENV = {"FUSED_A2A_BUFFER_ROWS": "8", "FUSED_A2A_TIMEOUT_S": "60"}


def _api():
    import torch_fused_a2a

    return torch_fused_a2a


class Case(NamedTuple):
    name: str
    n: int  # tokens per rank (HybridEP: equal on every rank)
    h: int
    l: int  # noqa: E741  (local experts)
    dtype: str  # key of torch_utils.DTYPES
    pad: int | None
    size: str  # "exact" (None) | "fit" | "slack" | "overflow": num_permuted_tokens
    seed: int
    k: int = 2  # experts per token (routing_map rows have k True entries, some rows none)
    fp8: str = ""  # "" | "quant" (fp8_dispatch=True) | "e4m3" (e4m3 x + scaling_factor)
    flags: str = ""  # "noprobs" | "helpers" | "rank0only" (only rank 0's experts are used)


WORLD_CASES = {
    2: (
        Case("g2_bf16_l2_exact", 17, 128, 2, "bf16", None, "exact", 1),
        Case("g2_fp32_l1_pad16_exact", 20, 64, 1, "fp32", 16, "exact", 2, k=1),
        Case("g2_fp16_l3_pad64_fit", 12, 128, 3, "fp16", 64, "fit", 3, k=3),
        Case("g2_bf16_l2_pad16_slack", 9, 128, 2, "bf16", 16, "slack", 4, flags="helpers"),
        Case("g2_bf16_l2_pad16_overflow", 30, 128, 2, "bf16", 16, "overflow", 5),
        Case("g2_fp32_l4_overflow", 25, 64, 4, "fp32", None, "overflow", 6, k=4),
        Case("g2_bf16_l2_noprobs", 11, 128, 2, "bf16", 0, "exact", 7, flags="noprobs"),
        Case("g2_bf16_l4_rank0only", 10, 128, 4, "bf16", 16, "exact", 8, flags="rank0only"),
        Case("g2_bf16_n0", 0, 128, 2, "bf16", 16, "exact", 9),
        Case("g2_fp8_quant_l2_pad16", 14, 256, 2, "bf16", 16, "exact", 10, fp8="quant"),
        Case("g2_fp8_e4m3_l2_pad16_slack", 14, 256, 2, "bf16", 16, "slack", 11, fp8="e4m3"),
        Case("g2_fp8_quant_overflow", 21, 128, 2, "bf16", 16, "overflow", 12, fp8="quant"),
    ),
    3: (
        Case("g3_bf16_l2_pad16_exact", 13, 128, 2, "bf16", 16, "exact", 21),
        Case("g3_fp32_l3_pad64_slack", 8, 64, 3, "fp32", 64, "slack", 22, k=3),
        Case("g3_fp16_l1_overflow", 19, 128, 1, "fp16", None, "overflow", 23, k=1),
        Case("g3_fp8_quant_l2_pad16_fit", 10, 128, 2, "bf16", 16, "fit", 24, fp8="quant"),
    ),
    4: (
        Case("g4_bf16_l2_exact", 15, 128, 2, "bf16", None, "exact", 31),
        Case("g4_bf16_l2_pad64_overflow", 11, 128, 2, "bf16", 64, "overflow", 32),
        Case("g4_fp32_l1_pad16_fit", 9, 64, 1, "fp32", 16, "fit", 33, k=3),
        Case("g4_bf16_l8_all_local", 6, 128, 8, "bf16", 16, "exact", 34, k=8),
        Case("g4_fp8_quant_l2_pad16", 12, 256, 2, "bf16", 16, "exact", 35, fp8="quant"),
    ),
    # EP 8 on CPU processes (issue 9 runs the same on 8 GPUs when such a machine is lent)
    8: (
        Case("g8_bf16_l2_pad16_exact", 7, 128, 2, "bf16", 16, "exact", 41),
        Case("g8_fp8_quant_l1_overflow", 9, 128, 1, "bf16", 16, "overflow", 42, fp8="quant"),
    ),
}
ALL_CASES = [(world, case) for world, cases in WORLD_CASES.items() for case in cases]
CASE_IDS = [case.name for _, case in ALL_CASES]


def make_inputs(case: Case, world: int) -> dict:
    """Deterministic inputs of every rank, the reference dispatch, and num_permuted_tokens."""
    rng = np.random.default_rng(case.seed)
    np_dtype = DTYPES[case.dtype][1]
    e = world * case.l
    xs, rms, ps, g_outs = [], [], [], []
    for _ in range(world):
        x = rng.standard_normal((case.n, case.h), dtype=np.float32)
        x[rng.random((case.n, case.h)) < 0.02] = -0.0  # signed zeros travel as they are
        xs.append(x.astype(np_dtype))
        rm = np.zeros((case.n, e), bool)
        experts = case.l if case.flags == "rank0only" else e
        for t in range(case.n):
            if rng.random() >= 0.15:  # else: routed nowhere
                rm[t, rng.permutation(experts)[: min(case.k, experts)]] = True
        rms.append(rm)
        ps.append(rng.uniform(0.01, 1.0, (case.n, e)).astype(np.float32))  # also where not routed
        g_outs.append(rng.standard_normal((case.n, case.h), dtype=np.float32).astype(np_dtype))
    probs = None if case.flags == "noprobs" else ps
    exact = R.hybrid_dispatch(xs, rms, probs, case.l, case.pad)
    needed = [d["handle"]["num_real_rows"] for d in exact]
    p = {
        "exact": None,
        "fit": max(needed),
        "slack": max(needed) + 13,
        "overflow": max(0, min(needed) - 11),
    }[case.size]
    disp = R.hybrid_dispatch(xs, rms, probs, case.l, case.pad, p, fp8=bool(case.fp8))
    rows = [d["handle"]["num_rows"] for d in disp]
    ys = [rng.standard_normal((m, case.h), dtype=np.float32).astype(np_dtype) for m in rows]
    g_hidden = [rng.standard_normal((m, case.h), dtype=np.float32).astype(np_dtype) for m in rows]
    g_probs = [rng.standard_normal(m, dtype=np.float32) for m in rows]
    fp8_x = [R.fp8_quantize(x) for x in xs] if case.fp8 == "e4m3" else None
    return dict(
        xs=xs, rms=rms, probs=probs, g_outs=g_outs, ys=ys, g_hidden=g_hidden, g_probs=g_probs,
        p=p, disp=disp, fp8_x=fp8_x,
    )  # fmt: skip


def _np(t):
    if t is None:
        return None
    if t.dtype == torch.float8_e4m3fn:
        return t.detach().cpu().contiguous().view(torch.uint8).numpy().view(E4M3).copy()
    return to_numpy(t)


def _e4m3(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a).view(np.uint8).copy()).view(torch.float8_e4m3fn)


# ----------------------------------------------------------------------------- rank side


def _run_case(tfa, group, rank, world, case):
    inp = make_inputs(case, world)
    if case.fp8 == "quant":
        tfa.init_hybrid_ep_buffer(group, case.h, case.n, case.l, 24, 24, True)
    x = from_numpy(inp["xs"][rank])
    scaling = None
    if case.fp8 == "e4m3":
        q, s = inp["fp8_x"][rank]
        x, scaling = _e4m3(q), torch.from_numpy(s.copy())
    else:
        x.requires_grad_()
    rm = torch.from_numpy(inp["rms"][rank].copy())
    probs = None
    if inp["probs"] is not None:
        probs = torch.from_numpy(inp["probs"][rank].copy()).requires_grad_()
    p, pad = inp["p"], case.pad
    if case.flags == "helpers":
        out = tfa.hybrid_ep_dispatch(x, rm, probs, group, case.l, 24, 24, p, pad, scaling)
    else:
        out = tfa.HybridEPDispatch.apply(x, rm, probs, group, case.l, 24, 24, p, pad, scaling)
    hidden, dprobs, scales, tpe, handle = out
    res = dict(
        hidden=_np(hidden), probs=_np(dprobs), scales=_np(scales), tpe=_np(tpe),
        tpe_meta=(str(tpe.dtype), tpe.device.type), row_token=_np(handle.row_token),
        overflow=handle.overflow, probs_none=dprobs is None, scales_none=scales is None,
    )  # fmt: skip
    if case.fp8:  # FP8 rows: forward only
        tfa.reset_hybrid_ep_buffer()
        return res
    # Megatron-style round trip: permute, multiply by probs, unpermute.
    if dprobs is not None:
        scaled = (hidden.detach().float() * dprobs.detach()[:, None]).to(hidden.dtype)
        res["round_trip"] = _np(tfa.HybridEPCombine.apply(scaled, handle, p, pad))
    y = from_numpy(inp["ys"][rank]).requires_grad_()
    if case.flags == "helpers":
        combined = tfa.hybrid_ep_combine(y, handle, p, pad)
    else:
        combined = tfa.HybridEPCombine.apply(y, handle, p, pad)
    combined.backward(from_numpy(inp["g_outs"][rank]))
    grads = [from_numpy(inp["g_hidden"][rank])]
    outs = [hidden]
    if dprobs is not None:
        grads.append(torch.from_numpy(inp["g_probs"][rank].copy()))
        outs.append(dprobs)
    torch.autograd.backward(outs, grads)
    res.update(combined=_np(combined), dy=_np(y.grad), dx=_np(x.grad))
    res["dprobs"] = _np(probs.grad) if probs is not None else None
    return res


def _rank_cases(rank, world, cases):
    import torch.distributed as dist

    torch.set_num_threads(1)
    tfa = _api()
    results = {}
    for case in cases:
        try:
            results[case.name] = _run_case(tfa, dist.group.WORLD, rank, world, case)
        except Exception:
            results[case.name] = {"error": traceback.format_exc()}
    from torch_fused_a2a import _ops

    results["_routes"] = dict(_ops.ROUTE_COUNTS)
    return results


# ----------------------------------------------------------------------------- parent side


@functools.cache
def _inputs(world, case):
    return make_inputs(case, world)


def _results(world, case):
    res = run_once(
        ("cases", world),
        lambda: run_ranks(_rank_cases, world, WORLD_CASES[world], timeout=300, env=ENV),
    )
    per_rank = [res[r][case.name] for r in range(world)]
    errors = [f"rank {r}:\n{p['error']}" for r, p in enumerate(per_rank) if "error" in p]
    if errors:
        pytest.fail("\n".join(errors))
    return per_rank


def test_op_layer_route_same_bits():
    """As tests/test_torch_normal.py's: the HybridEP Functions' direct calls of the ops' bodies
    and FUSED_A2A_TORCH_DIRECT=0's calls through torch.library give the same bits (G = 2)."""
    direct = run_once(
        ("cases", 2), lambda: run_ranks(_rank_cases, 2, WORLD_CASES[2], timeout=300, env=ENV)
    )
    layered = run_once(
        ("cases-op-layer", 2),
        lambda: run_ranks(
            _rank_cases,
            2,
            WORLD_CASES[2],
            timeout=300,
            env={**ENV, "FUSED_A2A_TORCH_DIRECT": "0"},
        ),
    )
    assert_same_routes(direct, layered, WORLD_CASES[2])


@pytest.mark.parametrize("world,case", ALL_CASES, ids=CASE_IDS)
def test_dispatch_forward(world, case):
    per_rank, inp = _results(world, case), _inputs(world, case)
    for r, (got, exp) in enumerate(zip(per_rank, inp["disp"], strict=True)):
        tag = f"rank {r}"
        assert_bitwise_equal(got["hidden"], exp["hidden"], f"{tag} dispatched_hidden")
        if inp["probs"] is None:
            assert got["probs_none"], "dispatched_probs must be None without probs"
        else:
            assert_bitwise_equal(got["probs"], exp["probs"], f"{tag} dispatched_probs")
        if case.fp8:
            assert_bitwise_equal(got["scales"], exp["scaling_factor"], f"{tag} scaling_factor")
            deq = R.fp8_dequantize(got["hidden"], got["scales"])
            assert_bitwise_equal(
                deq, R.fp8_dequantize(exp["hidden"], exp["scaling_factor"]), f"{tag} dequantised"
            )
        else:
            assert got["scales_none"], "dispatched_scaling_factor must be None without FP8"
        expected_device = "cpu"
        assert got["tpe_meta"] == ("torch.int64", expected_device), got["tpe_meta"]
        assert_bitwise_equal(got["tpe"], exp["tokens_per_expert"], f"{tag} tokens_per_expert")
        assert_bitwise_equal(
            got["row_token"].astype(np.int64), exp["handle"]["row_token"], f"{tag} row map"
        )
        assert got["overflow"] == exp["overflow"], f"{tag} overflow flag"
        assert (case.size == "overflow") == any(d["overflow"] for d in inp["disp"]), case
        if case.pad:
            pad_rows = exp["handle"]["row_token"] < 0
            assert not got["hidden"][pad_rows].astype(np.float32).any(), f"{tag} padding rows"
            if case.size != "overflow":
                assert (got["tpe"] % case.pad == 0).all(), f"{tag} FP8/GEMM padding check"


def _float_cases():
    return [(w, c) for w, c in ALL_CASES if not c.fp8]


FLOAT_IDS = [c.name for _, c in _float_cases()]


@pytest.mark.parametrize("world,case", _float_cases(), ids=FLOAT_IDS)
def test_combine_forward_and_backward(world, case):
    per_rank, inp = _results(world, case), _inputs(world, case)
    outs, _ = R.hybrid_combine(inp["ys"], inp["disp"])
    dys = R.hybrid_combine_backward(inp["g_outs"], inp["disp"])
    for r in range(world):
        assert_bitwise_equal(per_rank[r]["combined"], outs[r], f"rank {r} combined_hidden")
        assert_bitwise_equal(per_rank[r]["dy"], dys[r], f"rank {r} combine input grad")


@pytest.mark.parametrize("world,case", _float_cases(), ids=FLOAT_IDS)
def test_dispatch_backward(world, case):
    per_rank, inp = _results(world, case), _inputs(world, case)
    g_probs = None if inp["probs"] is None else inp["g_probs"]
    dxs, dps = R.hybrid_dispatch_backward(inp["g_hidden"], g_probs, inp["disp"])
    for r in range(world):
        assert_bitwise_equal(per_rank[r]["dx"], dxs[r], f"rank {r} x.grad")
        if dps is None:
            assert per_rank[r]["dprobs"] is None
        else:
            assert_bitwise_equal(per_rank[r]["dprobs"], dps[r], f"rank {r} probs.grad")


@pytest.mark.parametrize(
    "world,case", [(w, c) for w, c in _float_cases() if c.flags != "noprobs"],
    ids=[c.name for _, c in _float_cases() if c.flags != "noprobs"],
)  # fmt: skip
def test_dropless_round_trip(world, case):
    """permute -> multiply by probs -> unpermute == x * (sum of the probs of the kept rows)."""
    per_rank, inp = _results(world, case), _inputs(world, case)
    scaled = [
        (d["hidden"].astype(np.float32) * d["probs"][:, None]).astype(d["hidden"].dtype)
        for d in inp["disp"]
    ]
    outs, _ = R.hybrid_combine(scaled, inp["disp"])
    n, e = case.n, world * case.l
    kept = np.zeros((world * n, e), np.float32)
    for rho, d in enumerate(inp["disp"]):
        real = d["handle"]["row_token"] >= 0
        cols = rho * case.l + d["handle"]["row_expert"][real]
        kept[d["handle"]["row_token"][real], cols] = d["probs"][real]
    tol = {"fp32": 1e-5, "fp16": 5e-3, "bf16": 3e-2}[case.dtype]
    for r in range(world):
        got = per_rank[r]["round_trip"]
        assert_bitwise_equal(got, outs[r], f"rank {r} round trip")
        expect = inp["xs"][r].astype(np.float32) * kept[r * n : (r + 1) * n].sum(1)[:, None]
        np.testing.assert_allclose(got.astype(np.float32), expect, rtol=tol, atol=tol)
        if case.size != "overflow":  # dropless: every routed prob was kept
            routed = inp["rms"][r] & True
            assert np.array_equal(kept[r * n : (r + 1) * n] != 0, routed)


# ----------------------------------------------------------------------------- misc


def _outcome(fn):
    try:
        fn()
    except Exception as exc:
        return (type(exc).__name__, str(exc))
    return (None, "no exception raised")


def _rank_misc(rank, world):
    import warnings

    import torch.distributed as dist

    torch.set_num_threads(1)
    tfa = _api()
    hep = __import__("torch_fused_a2a.hybrid_ep", fromlist=["x"])
    group = dist.group.WORLD
    out = {}
    rng = np.random.default_rng(5)
    e = 2 * world

    def inputs(n, h=128, dtype=torch.bfloat16):
        x = torch.from_numpy(rng.standard_normal((n, h), dtype=np.float32)).to(dtype)
        rm = torch.from_numpy(rng.random((n, e)) < 0.4)
        return x, rm, torch.from_numpy(rng.random((n, e), dtype=np.float32))

    # Lazy init, module global, the package-level alias.
    tfa.reset_hybrid_ep_buffer()
    out["none_after_reset"] = hep._hybrid_ep_buffer is None
    x, rm, p = inputs(8)
    tfa.HybridEPDispatch.apply(x, rm, p, group, 2)
    out["lazy"] = (
        hep._hybrid_ep_buffer is not None and tfa._hybrid_ep_buffer is hep._hybrid_ep_buffer
    )

    # Growth: warns once.
    tfa.init_hybrid_ep_buffer(group, 128, 8, 2, 24, 24, False)
    hep._growth_warned = False
    first = hep._hybrid_ep_buffer
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for h, dtype in ((128, torch.bfloat16), (1024, torch.bfloat16), (2048, torch.float32)):
            x, rm, p = inputs(8, h, dtype)
            hid, _, _, _, handle = tfa.HybridEPDispatch.apply(x, rm, p, group, 2)
            tfa.HybridEPCombine.apply(hid, handle)
    out["growth"] = dict(
        warnings=[str(w.message) for w in caught if "growing" in str(w.message)],
        grew=hep._hybrid_ep_buffer is not first,
        bytes=(first.num_bytes, hep._hybrid_ep_buffer.num_bytes),
    )

    # Unequal N: a ValueError on every rank, naming each rank's N; the buffer stays usable.
    x, rm, p = inputs(6 + 2 * rank)
    out["unequal"] = _outcome(lambda: tfa.HybridEPDispatch.apply(x, rm, p, group, 2))
    x, rm, p = inputs(7)
    hid, _, _, _, handle = tfa.HybridEPDispatch.apply(x, rm, p, group, 2, 24, 24, None, 16)
    comb = tfa.HybridEPCombine.apply(hid, handle, None, 16)
    out["after_unequal"] = bool(
        torch.equal(comb, (x.float() * rm.sum(1, keepdim=True)).to(x.dtype))
    )

    # Bad inputs (checked before any communication, so each rank raises on its own).
    x, rm, p = inputs(4)
    d = tfa.HybridEPDispatch.apply
    bad = {
        "routing_map_float": lambda: d(x, rm.float(), p, group, 2),
        "routing_map_shape": lambda: d(x, rm[:, :3].contiguous(), p, group, 2),
        "routing_map_rows": lambda: d(x, rm[:3], p, group, 2),
        "probs_shape": lambda: d(x, rm, p[:, :3].contiguous(), group, 2),
        "probs_bf16": lambda: d(x, rm, p.bfloat16(), group, 2),
        "pad_multiple_negative": lambda: d(x, rm, p, group, 2, 24, 24, None, -1),
        "num_permuted_tokens_negative": lambda: d(x, rm, p, group, 2, 24, 24, -3),
        "num_sms_odd": lambda: d(x, rm, p, group, 2, 23),
        "x_1d": lambda: d(x[0], rm, p, group, 2),
        "x_int32": lambda: d(x.to(torch.int32), rm, p, group, 2),
        "x_noncontiguous": lambda: d(x.t(), rm, p, group, 2),
        "num_local_experts_zero": lambda: d(x, rm, p, group, 0),
    }
    out["bad"] = {name: _outcome(fn) for name, fn in bad.items()}
    hid, _, _, _, handle = d(x, rm, p, group, 2, 24, 24, None, 16)
    c = tfa.HybridEPCombine.apply
    out["bad"]["combine_rows"] = _outcome(lambda: c(hid[:-1].contiguous(), handle))
    out["bad"]["combine_pad_multiple"] = _outcome(lambda: c(hid, handle, None, 64))
    out["bad"]["combine_pad_negative"] = _outcome(lambda: c(hid, handle, None, -1))
    out["bad"]["combine_handle"] = _outcome(lambda: c(hid, (1, 2)))
    c(hid, handle)  # the collective sequence stays aligned

    # The helpers skip their autograd Functions when nothing needs a gradient: the same bits
    x, rm, p = inputs(8)
    with counted_applies(tfa.HybridEPDispatch, tfa.HybridEPCombine) as applies:

        def both(x_in, p_in):
            hid, probs, _, tpe, handle = tfa.hybrid_ep_dispatch(x_in, rm, p_in, group, 2)
            comb = tfa.hybrid_ep_combine(hid, handle)
            return [_np(t.detach()).tobytes() for t in (hid, probs, tpe, comb)], len(applies)

        with torch.no_grad():
            no_grad, n_no_grad = both(x, p)
        plain, n_plain = both(x, p)
        graded, n_graded = both(x, p.clone().requires_grad_())  # probs alone needs one
    out["no_grad"] = dict(
        applies=(n_no_grad, n_plain - n_no_grad, n_graded - n_plain),
        same=no_grad == graded and plain == graded,
    )
    tfa.reset_hybrid_ep_buffer()
    return out


BAD_EXPECT = {  # name -> (exception types, regex the message must match)
    "routing_map_float": (("TypeError",), r"routing_map.*(bool|float)"),
    "routing_map_shape": (("ValueError",), r"routing_map"),
    "routing_map_rows": (("ValueError",), r"routing_map"),
    "probs_shape": (("ValueError",), r"probs"),
    "probs_bf16": (("TypeError",), r"probs.*(bfloat16|float32)"),
    "pad_multiple_negative": (("ValueError",), r"pad_multiple.*-1"),
    "num_permuted_tokens_negative": (("ValueError",), r"num_permuted_tokens.*-3"),
    "num_sms_odd": (("ValueError",), r"num_sms_dispatch_api.*23"),
    "x_1d": (("ValueError",), r"\bx\b"),
    "x_int32": (("TypeError",), r"\bx\b.*int32"),
    "x_noncontiguous": (("ValueError",), r"\bx\b.*contiguous"),
    "num_local_experts_zero": (("ValueError",), r"num_local_experts.*0"),
    "combine_rows": (("ValueError",), r"rows"),
    "combine_pad_multiple": (("ValueError",), r"pad_multiple=64"),
    "combine_pad_negative": (("ValueError",), r"pad_multiple.*-1"),
    "combine_handle": (("TypeError",), r"handle"),
}


@functools.cache
def _misc(world):
    return run_ranks(_rank_misc, world, timeout=300, env=ENV)


def test_helpers_without_grad_skip_the_functions():
    """hybrid_ep_dispatch / hybrid_ep_combine run their forwards by themselves when nothing
    needs a gradient, through the Functions when probs requires grad; the same bits."""
    for r, res in enumerate(_misc(2)):
        assert res["no_grad"]["applies"] == (0, 0, 2), (r, res["no_grad"]["applies"])
        assert res["no_grad"]["same"], r


@pytest.mark.parametrize("world", [2, 3])
def test_unequal_tokens_error_on_every_rank(world):
    for r, res in enumerate(_misc(world)):
        kind, msg = res["unequal"]
        assert kind == "ValueError", (r, kind, msg)
        for rr in range(world):
            assert re.search(rf"rank {rr}: N={6 + 2 * rr}\b", msg), msg
        assert res["after_unequal"], f"rank {r}: the buffer is unusable after the error"


def test_lazy_init_and_growth_warns_once():
    for res in _misc(2):
        assert res["none_after_reset"] and res["lazy"]
        g = res["growth"]
        assert g["grew"] and g["bytes"][1] > g["bytes"][0], g
        assert len(g["warnings"]) == 1, g["warnings"]


@pytest.mark.parametrize("name", sorted(BAD_EXPECT))
def test_bad_inputs(name):
    kinds, pattern = BAD_EXPECT[name]
    for r, res in enumerate(_misc(2)):
        kind, msg = res["bad"][name]
        assert kind in kinds, (r, name, kind, msg)
        assert re.search(pattern, msg), (r, name, msg)


# ----------------------------------------------------------------------------- opcheck


def _opcheck_hybrid(rank, world):
    import torch.distributed as dist

    tfa = _api()
    hep = __import__("torch_fused_a2a.hybrid_ep", fromlist=["x"])
    group = dist.group.WORLD
    torch.manual_seed(0)
    n, h, lpr = 6, 128, 2
    x = torch.randn(n, h, dtype=torch.bfloat16)
    rm = torch.rand(n, lpr) < 0.5
    probs = torch.rand(n, lpr)
    tfa.init_hybrid_ep_buffer(group, h, n, lpr, 24, 24, False)
    b = hep._hybrid_ep_buffer.buffer
    gid, r = b.group_id, b.rank
    ops, checked = torch.ops.fused_a2a, []
    for rows, quant in ((-1, False), (5, False), (16, True)):
        args = (x, None, rm, probs, lpr, 4, rows, quant, gid, r, world, 24)
        torch.library.opcheck(ops.hybrid_dispatch.default, args)
        checked.append(f"hybrid_dispatch[P={rows},fp8={quant}]")
    # dynamic P: the notify phase's host copy of tokens_per_expert equals the data phase's
    dyn = ops.hybrid_dispatch(x, None, rm, probs, lpr, 4, -1, False, gid, r, world, 24)
    assert dyn[7].device.type == "cpu" and dyn[7].dtype == torch.int32, dyn[7]
    assert dyn[7].tolist() == dyn[5].tolist() and sum(dyn[7].tolist()) == dyn[0].shape[0], dyn
    out = ops.hybrid_dispatch(x, None, rm, probs, lpr, 4, 16, False, gid, r, world, 24)
    hidden, dprobs, _, counts, row_token, _, meta, host_counts = out
    assert host_counts.shape == (0,), host_counts  # static P: no host copy
    args = (hidden, dprobs, counts, row_token, meta, lpr, 4, n, gid, r, 24)
    torch.library.opcheck(ops.hybrid_combine.default, args)
    checked.append("hybrid_combine")
    args = (x, rm, counts, row_token, meta, lpr, 4, gid, r, 24)
    torch.library.opcheck(ops.hybrid_cached_dispatch.default, args)
    checked.append("hybrid_cached_dispatch")
    tfa.reset_hybrid_ep_buffer()
    return checked


def test_opcheck_hybrid_ops():
    (checked,) = run_ranks(_opcheck_hybrid, 1, timeout=180)
    assert len(checked) == 5, checked


def test_buffer_fanout_sizing(monkeypatch):
    """FUSED_A2A_HYBRID_FANOUT=f sizes a buffer's slot for `rows` tokens sending f combine rows to
    one rank each (one CUDA combine round at fan-out f); out-of-range values are refused."""
    import fused_a2a_core as core

    h, bpv, el, g, rows = 7168, 2, 128, 2, 4096
    monkeypatch.delenv("FUSED_A2A_HYBRID_FANOUT", raising=False)
    base = core.hybrid_buffer_bytes(h, bpv, el, g, 0, rows)
    monkeypatch.setenv("FUSED_A2A_HYBRID_FANOUT", "8")
    wide = core.hybrid_buffer_bytes(h, bpv, el, g, 0, rows)
    combine_row = h * bpv + 16  # values (16-byte multiple) + tag, prob, expert
    assert wide // g >= rows * 8 * combine_row > base // g
    for bad in ("0", str(el + 1), "x"):
        monkeypatch.setenv("FUSED_A2A_HYBRID_FANOUT", bad)
        with pytest.raises(ValueError, match="FUSED_A2A_HYBRID_FANOUT"):
            core.hybrid_buffer_bytes(h, bpv, el, g, 0, rows)
