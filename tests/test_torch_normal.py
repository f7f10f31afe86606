"""torch_fused_a2a normal mode (SEMANTICS.md section 1) on real gloo ranks, bit for bit.

Every case runs FusedDispatch -> a local differentiable op -> FusedCombine -> loss -> backward on
G = 2, 3, 4 processes (tests/mp.py) and compares recv_x, recv indices, recv probs,
tokens_per_expert, the combined output, dy (combine backward = cached dispatch), x.grad and
token_probs.grad with tests/reference.py, bitwise. The local op reads every slot of the received
probs, owned or not, so token_probs.grad also checks that only the owner's slot flows back.

All cases of one group size share one spawn (one process group, one buffer that grows as H
changes); a module-level cache runs each spawn once and the parametrised tests read from it.
Expected run time: about 1 minute on 2 cores (5 spawns of 2-4 processes, ~3-8 s each, plus the
3 s timeout case).

Conventions: for G=3, E is 6 or 48 (E must be a multiple of G; 8 and 64 are used for G=2, 4).
Exception types: shape/value errors must be ValueError, dtype errors TypeError or ValueError
(RuntimeError is not accepted there, so that an accidental torch error cannot pass).
"""

from __future__ import annotations

import functools
import os
import re
import sys
import time
import traceback
from typing import NamedTuple

import numpy as np
import pytest
import reference as R
import torch
from mp import run_once, run_ranks
from reference import assert_bitwise_equal
from torch_utils import DTYPES, assert_same_routes, counted_applies, from_numpy, to_numpy

NORMAL_API = (
    "FusedDispatch",
    "FusedCombine",
    "fused_dispatch",
    "fused_combine",
    "get_buffer",
    "get_hidden_bytes",
    "set_deepep_num_sms",
    "_is_nvshmem_available",
)


def _api():
    """The frontend under test (imported lazily: an ImportError fails the tests, not collection)."""
    import torch_fused_a2a

    return torch_fused_a2a


class Case(NamedTuple):
    name: str
    ns: tuple  # tokens on each rank of the group
    k: int
    e: int
    h: int
    dtype: str  # key of torch_utils.DTYPES
    seed: int
    flags: str = ""  # "" | "async" (async_finish + allocate_on_comm_stream) | "helpers"
    group_size: int = 0  # 0: the whole world; else consecutive groups of this size


WORLD_CASES = {
    2: (
        Case("g2_bf16_k2_e8_h16", (5, 0), 2, 8, 16, "bf16", 1),
        Case("g2_fp16_k1_e8_h16", (7, 3), 1, 8, 16, "fp16", 2),
        Case("g2_fp32_k8_e64_h16", (4, 9), 8, 64, 16, "fp32", 3),
        Case("g2_bf16_k8_e8_h16", (6, 5), 8, 8, 16, "bf16", 4),
        Case("g2_bf16_k2_e64_h7168", (6, 2), 2, 64, 7168, "bf16", 5),
        Case("g2_fp32_k2_e8_h16_no_tokens", (0, 0), 2, 8, 16, "fp32", 6),
        Case("g2_bf16_k2_e8_h16_async", (3, 4), 2, 8, 16, "bf16", 7, flags="async"),
        Case("g2_fp16_k2_e8_h16_helpers", (4, 4), 2, 8, 16, "fp16", 8, flags="helpers"),
    ),
    3: (
        Case("g3_bf16_k2_e6_h16", (4, 0, 6), 2, 6, 16, "bf16", 11),
        Case("g3_fp16_k8_e48_h16", (5, 2, 3), 8, 48, 16, "fp16", 12),
        Case("g3_fp32_k1_e48_h7168", (3, 3, 1), 1, 48, 7168, "fp32", 13),
        Case("g3_fp32_k2_e6_h16", (8, 1, 0), 2, 6, 16, "fp32", 14),
        Case("g3_bf16_k8_e48_h7168", (2, 5, 4), 8, 48, 7168, "bf16", 15),
    ),
    4: (
        Case("g4_bf16_k2_e8_h16", (2, 0, 5, 3), 2, 8, 16, "bf16", 21),
        Case("g4_fp32_k8_e64_h16", (6, 4, 1, 7), 8, 64, 16, "fp32", 22),
        Case("g4_fp16_k1_e64_h7168", (3, 5, 0, 2), 1, 64, 7168, "fp16", 23),
        Case("g4_bf16_k8_e64_h7168", (12, 24, 1, 7), 8, 64, 7168, "bf16", 24),
        Case("g4_fp16_k8_e8_h16", (9, 3, 3, 0), 8, 8, 16, "fp16", 25),
        # two EP groups {0,1} and {2,3}: group rank != global rank, a new buffer per group
        Case("g4_subgroups_bf16_k2_e8_h16", (3, 5), 2, 8, 16, "bf16", 26, group_size=2),
    ),
    # EP 8 on CPU processes (issue 9 runs the same on 8 GPUs when such a machine is lent)
    8: (
        Case("g8_bf16_k8_e64_h16", (5, 0, 3, 9, 1, 4, 6, 2), 8, 64, 16, "bf16", 31),
        Case("g8_fp32_k2_e16_h1024", (2, 3, 0, 1, 4, 2, 2, 5), 2, 16, 1024, "fp32", 32),
        # two EP 4 groups {0..3} and {4..7}
        Case("g8_subgroups_fp16_k2_e8_h16", (3, 5, 0, 2), 2, 8, 16, "fp16", 33, group_size=4),
    ),
}
ALL_CASES = [(world, case) for world, cases in WORLD_CASES.items() for case in cases]
CASE_IDS = [case.name for _, case in ALL_CASES]


def make_inputs(case: Case, group_index: int = 0) -> dict:
    """Deterministic inputs of every rank of one group (lists indexed by group rank)."""
    rng = np.random.default_rng([case.seed, group_index])
    np_dtype = DTYPES[case.dtype][1]
    xs, idxs, ws, gouts = [], [], [], []
    forced_nowhere = False
    for n in case.ns:
        x = rng.standard_normal((n, case.h), dtype=np.float32)
        x[rng.random((n, case.h)) < 0.02] = -0.0  # signed zeros must travel as they are
        xs.append(x.astype(np_dtype))
        idx = np.full((n, case.k), -1, np.int64)
        for t in range(n):
            if rng.random() >= 0.15:  # else: routed nowhere
                idx[t] = rng.permutation(case.e)[: case.k]  # distinct experts, like a router
        idx[rng.random((n, case.k)) < 0.2] = -1
        if n >= 2 and case.k > 1:
            idx[0, -1] = -1
        if n >= 2 and not forced_nowhere:
            idx[n - 1] = -1
            forced_nowhere = True
        idxs.append(idx)
        ws.append(rng.uniform(0.01, 1.0, (n, case.k)).astype(np.float32))  # also on -1 slots
        gouts.append(rng.standard_normal((n, case.h), dtype=np.float32).astype(np_dtype))
    coef = [float(c) for c in rng.uniform(-1, 1, case.k).astype(np.float32)]
    return dict(xs=xs, idxs=idxs, ws=ws, gouts=gouts, coef=coef)


def local_op(recv_x, recv_w, coef):
    """A differentiable op of recv_x and of every slot of recv_w (owned or not)."""
    s = recv_w[:, 0] * coef[0] + 1.0
    for k in range(1, len(coef)):
        s = s + recv_w[:, k] * coef[k]
    return (recv_x.float() * s[:, None]).to(recv_x.dtype)


# ----------------------------------------------------------------------------- rank side


def _run_case(tfa, group, group_rank, group_index, case, inp=None):
    inp = inp or make_inputs(case, group_index)
    r = group_rank
    x = from_numpy(inp["xs"][r]).requires_grad_()
    idx = from_numpy(inp["idxs"][r])
    w = from_numpy(inp["ws"][r]).requires_grad_()
    flag = case.flags == "async"
    if case.flags == "helpers":
        recv_x, recv_idx, recv_w, tpe, handle = tfa.fused_dispatch(x, idx, w, case.e, group)
    else:
        recv_x, recv_idx, recv_w, tpe, handle = tfa.FusedDispatch.apply(
            x, idx, w, case.e, group, flag, flag
        )
    recv_x.retain_grad()
    recv_w.retain_grad()
    y = local_op(recv_x, recv_w, inp["coef"])
    y.retain_grad()
    if case.flags == "helpers":
        out, extra = tfa.fused_combine(y, group, handle)
    else:
        out, extra = tfa.FusedCombine.apply(y, group, handle, flag, flag)
    (out.float() * from_numpy(inp["gouts"][r]).float()).sum().backward()
    return dict(
        recv_x=to_numpy(recv_x),
        recv_idx=to_numpy(recv_idx),
        recv_w=to_numpy(recv_w),
        tpe=to_numpy(tpe),
        tpe_meta=(str(tpe.dtype), tpe.device.type),
        y=to_numpy(y),
        out=to_numpy(out),
        extra_is_none=extra is None,
        dy=to_numpy(y.grad),
        d_recv_x=to_numpy(recv_x.grad),
        d_recv_w=to_numpy(recv_w.grad),
        dx=to_numpy(x.grad),
        dw=to_numpy(w.grad),
    )


def _rank_normal(rank, world, cases):
    import torch.distributed as dist

    torch.set_num_threads(1)
    tfa = _api()
    groups, results = {}, {}
    for case in cases:
        size = case.group_size or world
        if size not in groups:  # every rank creates every subgroup, in the same order
            subgroups = [dist.new_group(list(range(i, i + size))) for i in range(0, world, size)]
            groups[size] = dist.group.WORLD if size == world else subgroups[rank // size]
        group = groups[size]
        try:
            results[case.name] = _run_case(tfa, group, dist.get_rank(group), rank // size, case)
        except Exception:
            results[case.name] = {"error": traceback.format_exc()}
    from torch_fused_a2a import _ops

    results["_routes"] = dict(_ops.ROUTE_COUNTS)
    return results


# ----------------------------------------------------------------------------- parent side


def _groups(world, case):
    """[(group index, [global ranks of the group])]."""
    size = case.group_size or world
    return [(i // size, list(range(i, i + size))) for i in range(0, world, size)]


@functools.cache
def _reference(case: Case, group_index: int):
    inp = make_inputs(case, group_index)
    return inp, R.dispatch(inp["xs"], inp["idxs"], inp["ws"], case.e)


def _case_results(world, case):
    res = run_once(
        ("normal", world), lambda: run_ranks(_rank_normal, world, WORLD_CASES[world], timeout=300)
    )
    per_rank = [res[r][case.name] for r in range(world)]
    errors = [f"rank {r}:\n{p['error']}" for r, p in enumerate(per_rank) if "error" in p]
    if errors:
        pytest.fail("\n".join(errors))
    return per_rank


@pytest.mark.parametrize("world,case", ALL_CASES, ids=CASE_IDS)
def test_dispatch_forward(world, case):
    per_rank = _case_results(world, case)
    for gi, ranks in _groups(world, case):
        _, disp = _reference(case, gi)
        for j, r in enumerate(ranks):
            got, exp, tag = per_rank[r], disp[j], f"rank {r}"
            assert_bitwise_equal(got["recv_x"], exp["recv_x"], f"{tag} recv_x")
            assert_bitwise_equal(  # token_indices' dtype (int64), as upstream
                got["recv_idx"], exp["recv_topk_idx"].astype(np.int64), f"{tag} recv_token_indices"
            )
            assert_bitwise_equal(got["recv_w"], exp["recv_topk_weights"], f"{tag} recv_probs")
            assert got["tpe_meta"] == ("torch.int64", "cpu"), f"{tag} tokens_per_expert"
            assert_bitwise_equal(got["tpe"], exp["tokens_per_expert"], f"{tag} tokens_per_expert")


@pytest.mark.parametrize("world,case", ALL_CASES, ids=CASE_IDS)
def test_combine_forward(world, case):
    per_rank = _case_results(world, case)
    for gi, ranks in _groups(world, case):
        _, disp = _reference(case, gi)
        ys = [per_rank[r]["y"] for r in ranks]
        outs, _ = R.combine(ys, disp, case.ns)
        for j, r in enumerate(ranks):
            assert per_rank[r]["extra_is_none"], "FusedCombine must return (combined_x, None)"
            assert_bitwise_equal(per_rank[r]["out"], outs[j], f"rank {r} combined_x")


@pytest.mark.parametrize("world,case", ALL_CASES, ids=CASE_IDS)
def test_combine_backward(world, case):
    per_rank = _case_results(world, case)
    for gi, ranks in _groups(world, case):
        inp, disp = _reference(case, gi)
        dys = R.combine_backward(inp["gouts"], disp)
        for j, r in enumerate(ranks):
            assert_bitwise_equal(per_rank[r]["dy"], dys[j], f"rank {r} combine input grad")


@pytest.mark.parametrize("world,case", ALL_CASES, ids=CASE_IDS)
def test_dispatch_backward(world, case):
    per_rank = _case_results(world, case)
    for gi, ranks in _groups(world, case):
        inp, disp = _reference(case, gi)
        g_recv_x = [per_rank[r]["d_recv_x"] for r in ranks]
        g_recv_w = [per_rank[r]["d_recv_w"] for r in ranks]
        dxs, dws = R.dispatch_backward(g_recv_x, g_recv_w, disp, inp["idxs"])
        for j, r in enumerate(ranks):
            assert_bitwise_equal(per_rank[r]["dx"], dxs[j], f"rank {r} x.grad")
            assert_bitwise_equal(per_rank[r]["dw"], dws[j], f"rank {r} token_probs.grad")
        if case.k > 1 and sum(d["num_recv"] for d in disp):
            # the op really did send gradients into slots a rank does not own
            non_owned = [g[d["recv_topk_idx"] < 0] for g, d in zip(g_recv_w, disp, strict=True)]
            assert any((v != 0).any() for v in non_owned)


# The dynamic dispatch's paths (torch_fused_a2a/_ops.py, _dispatch_body): the first call of a
# group waits for the counts (exact); later ones queue the data phase first (speculative), sized
# by the largest N seen; a group whose largest N grew runs again exactly (redo); a zero size
# bound (FUSED_A2A_TORCH_SPECULATIVE_MB=0) keeps every call exact.
SPECULATIVE_STEPS = (  # (tokens per rank, FUSED_A2A_TORCH_SPECULATIVE_MB, path)
    ((4, 0, 6), None, "exact"),
    ((2, 3, 1), None, "speculative"),
    ((9, 9, 2), None, "redo"),  # 9 > 6 seen
    ((0, 0, 0), None, "speculative"),
    ((5, 9, 5), None, "speculative"),
    ((3, 2, 1), "0", "exact"),
)


def _speculative_case(step: int) -> Case:
    return Case(f"spec{step}", SPECULATIVE_STEPS[step][0], 2, 6, 16, "bf16", 70 + step)


def _rank_speculative(rank, world):
    import torch.distributed as dist

    from torch_fused_a2a import _ops

    torch.set_num_threads(1)
    tfa = _api()
    device = torch.device("cpu")
    if os.environ.get("FA2A_TEST_DEVICE") == "cuda":  # tests/test_gpu_host_counts.py
        torch.cuda.set_device(rank)
        device = torch.device("cuda", rank)
    out = []
    for step, (_, bound, _) in enumerate(SPECULATIVE_STEPS):
        if bound is not None:
            os.environ["FUSED_A2A_TORCH_SPECULATIVE_MB"] = bound
        inp = make_inputs(_speculative_case(step))
        x, idx, w = (from_numpy(inp[k][rank]).to(device) for k in ("xs", "idxs", "ws"))
        before = dict(_ops.DYNAMIC_PATHS)
        recv_x, recv_idx, recv_w, tpe, _ = tfa.fused_dispatch(x, idx, w, 6, dist.group.WORLD)
        paths = {k: v - before[k] for k, v in _ops.DYNAMIC_PATHS.items() if v != before[k]}
        out.append(
            dict(
                paths=paths,
                recv_x=to_numpy(recv_x),
                recv_idx=to_numpy(recv_idx),
                recv_w=to_numpy(recv_w),
                tpe=to_numpy(tpe),
                contiguous=recv_x.is_contiguous(),
            )
        )
    return out


@pytest.mark.parametrize("kernel", ["two_kernels", "static"])
def test_dynamic_dispatch_speculative_paths(kernel):
    """The speculative calls run the static dispatch with the host counts and ticket (the
    default), or dispatch_notify + dispatch_data (FUSED_A2A_TORCH_SPECULATIVE=two_kernels)."""
    env = {"FUSED_A2A_TORCH_SPECULATIVE": "two_kernels"} if kernel == "two_kernels" else None
    res = run_ranks(_rank_speculative, 3, timeout=120, env=env)
    check_speculative_steps(res, one_kernel=kernel == "static")


def check_speculative_steps(res, one_kernel=False):
    """one_kernel: the speculative calls ran the static kernel (FUSED_A2A_TORCH_SPECULATIVE)."""
    world = len(res)
    spec = {"speculative": 1, "one_kernel": 1} if one_kernel else {"speculative": 1}
    expected_paths = {
        "exact": {"exact": 1},
        "speculative": spec,
        "redo": {**spec, "redo": 1, "exact": 1},
    }
    for step, (ns, _, path) in enumerate(SPECULATIVE_STEPS):
        inp = make_inputs(_speculative_case(step))
        ref = R.dispatch(inp["xs"], inp["idxs"], inp["ws"], 6)
        for r in range(world):
            got = res[r][step]
            where = f"step {step} (tokens {ns}), rank {r}"
            assert got["paths"] == expected_paths[path], where
            assert got["contiguous"], where
            assert_bitwise_equal(got["recv_x"], ref[r]["recv_x"], f"recv_x, {where}")
            assert_bitwise_equal(got["recv_idx"], ref[r]["recv_topk_idx"], f"recv_idx, {where}")
            assert_bitwise_equal(got["recv_w"], ref[r]["recv_topk_weights"], f"recv_w, {where}")
            assert_bitwise_equal(got["tpe"], ref[r]["tokens_per_expert"], f"tpe, {where}")


def test_op_layer_route_same_bits():
    """Eager calls run the ops' bodies directly (_ops.run); FUSED_A2A_TORCH_DIRECT=0 sends them
    through torch.library. Both routes give the same bits for every G = 2 case, and each run
    really took its route."""
    direct = run_once(
        ("normal", 2), lambda: run_ranks(_rank_normal, 2, WORLD_CASES[2], timeout=300)
    )
    layered = run_once(
        ("normal-op-layer", 2),
        lambda: run_ranks(
            _rank_normal, 2, WORLD_CASES[2], timeout=300, env={"FUSED_A2A_TORCH_DIRECT": "0"}
        ),
    )
    assert_same_routes(direct, layered, WORLD_CASES[2])


# ----------------------------------------------------------------------------- bad inputs

BASE = Case("base", (4, 4), 2, 8, 16, "bf16", 99)
_SHAPE = (ValueError,)
_DTYPE = (TypeError, ValueError)
_X = r"\bx\b|hidden"
_IDX = r"token_indices|topk_idx|indices"
_PROBS = r"token_probs|topk_weights|probs|weights"


def _bad(x, idx, w, e=8, flags=(False, False)):
    """(x, token_indices, token_probs, num_experts, (async_finish, allocate_on_comm_stream))."""
    return x, idx, w, e, flags


# name -> (make _bad(...) from good (x, idx, w), exception types, regexes the message must match)
BAD_INPUTS = {
    "x_3d": (lambda x, i, w: _bad(x.reshape(4, 2, 8), i, w), _SHAPE, [_X, r"\b3\b|4, 2, 8"]),
    "x_int32": (lambda x, i, w: _bad(x.to(torch.int32), i, w), _DTYPE, [_X, r"int32|Int"]),
    "x_float64": (lambda x, i, w: _bad(x.double(), i, w), _DTYPE, [_X, r"float64|[Dd]ouble"]),
    "hidden_bytes_not_16": (
        lambda x, i, w: _bad(x[:, :7].contiguous(), i, w),
        _SHAPE,
        [_X + r"|\bH\b", r"\b7\b|\b14\b"],
    ),
    "idx_float": (lambda x, i, w: _bad(x, i.float(), w), _DTYPE, [_IDX, r"[Ff]loat"]),
    "idx_rows_mismatch": (lambda x, i, w: _bad(x, i[:3], w[:3]), _SHAPE, [_IDX, r"\b3\b"]),
    "probs_shape_mismatch": (
        lambda x, i, w: _bad(x, i, torch.ones(4, 3)),
        _SHAPE,
        [_PROBS, r"\b3\b"],
    ),
    "idx_below_minus_one": (lambda x, i, w: _bad(x, _set(i, -2), w), _SHAPE, [_IDX, r"-2"]),
    "idx_not_below_E": (lambda x, i, w: _bad(x, _set(i, 9), w), _SHAPE, [_IDX, r"\b9\b"]),
    "E_not_multiple_of_G": (lambda x, i, w: _bad(x, i, w, e=7), _SHAPE, [r"num_experts", r"\b7\b"]),
    "probs_bf16": (
        lambda x, i, w: _bad(x, i, w.bfloat16()),
        _DTYPE,
        [_PROBS, r"bfloat16|BFloat16|bf16"],
    ),
    "probs_float64": (
        lambda x, i, w: _bad(x, i, w.double()),
        _DTYPE,
        [_PROBS, r"float64|[Dd]ouble"],
    ),
    "alloc_on_comm_stream_without_async": (
        lambda x, i, w: _bad(x, i, w, flags=(False, True)),
        _SHAPE,
        [r"allocate_on_comm_stream", r"async_finish"],
    ),
}


def _set(idx, value):
    idx = idx.clone()
    idx[1, 0] = value
    return idx


def _outcome(fn):
    try:
        fn()
    except Exception as exc:
        return ([c.__name__ for c in type(exc).__mro__], str(exc))
    return (None, "no exception raised")


def _rank_misc(rank, world):
    import torch.distributed as dist

    torch.set_num_threads(1)
    tfa = _api()
    group = dist.group.WORLD
    mod = sys.modules[tfa.get_buffer.__module__]
    out = {}
    b1 = tfa.get_buffer(group, 32)
    global_is_b1 = getattr(mod, "_buffer", None) is b1
    b2 = tfa.get_buffer(group, 16)  # smaller: the same buffer
    b3 = tfa.get_buffer(group, 2 * 7168 * 2)  # larger: may grow
    b4 = tfa.get_buffer(group, 32)  # never shrinks
    global_is_b4 = getattr(mod, "_buffer", None) is b4
    out["buffer"] = dict(
        b2_is_b1=b2 is b1, b4_is_b3=b4 is b3, global_is_b1=global_is_b1, global_is_b4=global_is_b4
    )

    inp = make_inputs(BASE)
    inp["idxs"] = [np.where(i >= 0, i % 6, -1) for i in inp["idxs"]]  # experts < 6: E=7 stays valid
    x, idx, w = (from_numpy(inp[k][rank]) for k in ("xs", "idxs", "ws"))

    def call(make):
        bx, bidx, bw, e, flags = make(x, idx, w)
        return tfa.FusedDispatch.apply(bx, bidx, bw, e, group, *flags)

    out["bad"] = {
        name: _outcome(lambda make=make: call(make)) for name, (make, _, _) in BAD_INPUTS.items()
    }
    # combine's flag rule needs a real handle
    recv_x, _, _, _, handle = tfa.FusedDispatch.apply(x, idx, w, 8, group)
    out["bad"]["combine_alloc_on_comm_stream_without_async"] = _outcome(
        lambda: tfa.FusedCombine.apply(recv_x, group, handle, False, True)
    )
    tfa.FusedCombine.apply(recv_x, group, handle)
    out["no_grad"] = _helpers_without_grad(tfa, group, x, idx, w)
    # nothing was corrupted: a full case still matches the reference
    try:
        out["after"] = _run_case(tfa, group, rank, 0, BASE, inp)
    except Exception:
        out["after"] = {"error": traceback.format_exc()}
    out["inputs"] = inp
    return out


def _helpers_without_grad(tfa, group, x, idx, w):
    """fused_dispatch / fused_combine when nothing needs a gradient (no_grad, or inputs that do
    not require grad) and when x requires grad: how often each went through an autograd
    Function's apply, whether the results have the same bits, which outputs require grad."""
    with counted_applies(tfa.FusedDispatch, tfa.FusedCombine) as applies:

        def both(x_in):
            recv_x, recv_idx, recv_w, tpe, handle = tfa.fused_dispatch(x_in, idx, w, 8, group)
            combined = tfa.fused_combine(recv_x, group, handle)[0]
            return (recv_x, recv_idx, recv_w, tpe, combined), len(applies)

        with torch.no_grad():
            no_grad, n_no_grad = both(x)
        plain, n_plain = both(x)
        graded, n_graded = both(x.clone().requires_grad_())

    def bits(ts):
        return [to_numpy(t.detach()).tobytes() for t in ts]

    return dict(
        applies=(n_no_grad, n_plain - n_no_grad, n_graded - n_plain),
        same=bits(no_grad) == bits(graded) and bits(plain) == bits(graded),
        requires_grad=[t.requires_grad for t in (no_grad[0], plain[0], plain[4], graded[4])],
    )


def _misc_results():
    return run_once(("misc", 2), lambda: run_ranks(_rank_misc, 2, timeout=180))


BAD_EXPECT = {name: (types, rx) for name, (_, types, rx) in BAD_INPUTS.items()}
BAD_EXPECT["combine_alloc_on_comm_stream_without_async"] = (
    _SHAPE,
    [r"allocate_on_comm_stream", r"async_finish"],
)


def test_apply_routes(monkeypatch):
    """_ops.apply: the Function when an input needs a gradient or torch.compile traces, its
    forward alone otherwise (grad mode off, or nothing requiring grad); the same values."""
    from torch_fused_a2a import _ops

    class Double(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            ctx.mark_non_differentiable()  # the plain context takes the marks too
            return x * 2

        @staticmethod
        def backward(ctx, grad):
            return grad * 2

    x = torch.arange(3.0)
    with counted_applies(Double) as applies:
        outs = [_ops.apply(Double, (x,), x)]  # nothing requires grad
        with torch.no_grad():
            xg = x.clone().requires_grad_()
            outs.append(_ops.apply(Double, (xg,), xg))  # grad mode off
        outs.append(_ops.apply(Double, (xg,), xg))  # a gradient needed: the Function
        monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
        outs.append(_ops.apply(Double, (x,), x))  # traced: the Function
    assert len(applies) == 2
    assert [o.requires_grad for o in outs] == [False, False, True, False]
    assert all(torch.equal(o.detach(), x * 2) for o in outs)


def test_helpers_without_grad_skip_the_functions():
    """Megatron's helpers run their forwards by themselves when nothing needs a gradient (no
    Function.apply: ~6 us a call), through FusedDispatch / FusedCombine when x requires grad;
    the same bits either way, and only the graded call's outputs require grad."""
    for r, res in enumerate(_misc_results()):
        got = res["no_grad"]
        assert got["applies"] == (0, 0, 2), (r, got["applies"])
        assert got["same"], r
        assert got["requires_grad"] == [False, False, False, True], (r, got["requires_grad"])


@pytest.mark.parametrize("name", list(BAD_EXPECT))
def test_bad_input(name):
    types, regexes = BAD_EXPECT[name]
    for rank, res in enumerate(_misc_results()):
        mro, message = res["bad"][name]
        assert mro is not None, f"rank {rank}: {name}: no exception raised"
        wanted = [t.__name__ for t in types]
        assert any(t in mro for t in wanted), f"rank {rank}: {name}: {mro[0]} ({message})"
        for rx in regexes:
            assert re.search(rx, message), f"rank {rank}: {name}: {rx!r} not in {message!r}"


def test_state_intact_after_bad_inputs():
    results = _misc_results()
    for res in results:
        assert "error" not in res["after"], res["after"].get("error")
    inp = results[0]["inputs"]
    disp = R.dispatch(inp["xs"], inp["idxs"], inp["ws"], BASE.e)
    outs, _ = R.combine([res["after"]["y"] for res in results], disp, BASE.ns)
    for rank, res in enumerate(results):
        assert_bitwise_equal(res["after"]["recv_x"], disp[rank]["recv_x"], f"rank {rank} recv_x")
        assert_bitwise_equal(res["after"]["out"], outs[rank], f"rank {rank} combined_x")


def test_get_buffer_reuses_and_never_shrinks():
    for rank, res in enumerate(_misc_results()):
        buf = res["buffer"]
        assert buf["b2_is_b1"], f"rank {rank}: a smaller request re-created the buffer"
        assert buf["b4_is_b3"], f"rank {rank}: a smaller request after growth shrank the buffer"
        assert buf["global_is_b1"] and buf["global_is_b4"], f"rank {rank}: module global _buffer"


# ----------------------------------------------------------------------------- timeout

TIMEOUT_CASE = Case("timeout", (3, 3), 2, 8, 16, "bf16", 31)


def _rank_timeout(rank, world, flag_path):
    import torch.distributed as dist

    torch.set_num_threads(1)
    tfa = _api()
    group = dist.group.WORLD
    inp = make_inputs(TIMEOUT_CASE)
    _run_case(tfa, group, rank, 0, TIMEOUT_CASE, inp)  # both ranks: buffer and state exist
    if rank == 1:  # never joins the next dispatch; stays alive until rank 0 is done
        deadline = time.monotonic() + 60
        while not os.path.exists(flag_path) and time.monotonic() < deadline:
            time.sleep(0.05)
        return None
    x, idx, w = (from_numpy(inp[k][0]) for k in ("xs", "idxs", "ws"))
    start = time.monotonic()
    mro, message = _outcome(lambda: tfa.FusedDispatch.apply(x, idx, w, TIMEOUT_CASE.e, group))
    elapsed = time.monotonic() - start
    with open(flag_path, "w"):
        pass
    return mro, message, elapsed


def test_missing_rank_times_out(tmp_path):
    flag = str(tmp_path / "rank0_done")
    res = run_ranks(_rank_timeout, 2, flag, timeout=90, env={"FUSED_A2A_TIMEOUT_S": "3"})
    mro, message, elapsed = res[0]
    assert mro is not None, "dispatch returned although rank 1 never joined"
    text = f"{mro[0]}: {message}"
    assert re.search("timeout", text, re.IGNORECASE), text
    assert "dispatch" in text.lower(), text
    assert re.search(r"(rank|peer)[^0-9]{0,40}\b1\b", message, re.IGNORECASE), text
    assert elapsed < 3 + 5, f"took {elapsed:.1f} s with FUSED_A2A_TIMEOUT_S=3"


# ----------------------------------------------------------------------------- local API


def test_public_names():
    tfa = _api()
    for name in NORMAL_API:
        assert callable(getattr(tfa, name)), name


@pytest.mark.parametrize(
    "dtype,per_value",
    [(torch.bfloat16, 2), (torch.float16, 2), (torch.float32, 4), (torch.float8_e4m3fn, 2)],
)
def test_get_hidden_bytes(dtype, per_value):
    assert _api().get_hidden_bytes(torch.empty(3, 7168, dtype=dtype)) == 7168 * per_value


def test_set_deepep_num_sms():
    tfa = _api()
    with pytest.raises(ValueError, match=r"\b23\b"):
        tfa.set_deepep_num_sms(23)
    tfa.set_deepep_num_sms(24)


def test_is_nvshmem_available():
    tfa = _api()
    value = tfa._is_nvshmem_available()
    assert isinstance(value, bool)
    mod = sys.modules[tfa._is_nvshmem_available.__module__]
    assert getattr(mod, "_nvshmem_available", None) is value
    if not torch.cuda.is_available():
        assert value is False


def test_speculative_kernel_choice(monkeypatch):
    """Which kernels the speculative dispatch runs (_ops._speculative_static): the static kernel
    by default for G <= 8; two kernels when asked, for FP8 rows that want the records kernel,
    G > 8 or FUSED_A2A_CUDA_LAYOUT=ready; a bad value names the variable and the value."""
    from torch_fused_a2a import _ops

    monkeypatch.delenv("FUSED_A2A_TORCH_SPECULATIVE", raising=False)
    monkeypatch.delenv("FUSED_A2A_CUDA_LAYOUT", raising=False)
    monkeypatch.delenv("FUSED_A2A_CUDA_RECV_PUSH", raising=False)
    monkeypatch.delenv("FUSED_A2A_CUDA_RECORDS", raising=False)
    assert _ops._speculative_static(8, fp8=False)
    assert not _ops._speculative_static(9, fp8=False)
    assert _ops._speculative_static(4, fp8=True)  # FP8 rows without records (recv push)
    monkeypatch.setenv("FUSED_A2A_CUDA_RECV_PUSH", "0")
    assert not _ops._speculative_static(4, fp8=True)
    assert _ops._speculative_static(4, fp8=False)
    monkeypatch.delenv("FUSED_A2A_CUDA_RECV_PUSH")
    monkeypatch.setenv("FUSED_A2A_CUDA_RECORDS", "1")
    assert not _ops._speculative_static(4, fp8=True)
    monkeypatch.setenv("FUSED_A2A_CUDA_RECORDS", "0")
    assert _ops._speculative_static(4, fp8=True)
    monkeypatch.delenv("FUSED_A2A_CUDA_RECORDS")
    monkeypatch.setenv("FUSED_A2A_CUDA_LAYOUT", "ready")
    assert not _ops._speculative_static(4, fp8=False)
    monkeypatch.setenv("FUSED_A2A_CUDA_LAYOUT", "dynamic")
    assert _ops._speculative_static(4, fp8=False)
    monkeypatch.setenv("FUSED_A2A_TORCH_SPECULATIVE", "two_kernels")
    assert not _ops._speculative_static(4, fp8=False)
    monkeypatch.setenv("FUSED_A2A_TORCH_SPECULATIVE", "fast")
    with pytest.raises(ValueError, match="FUSED_A2A_TORCH_SPECULATIVE.*'fast'"):
        _ops._speculative_static(4, fp8=False)
