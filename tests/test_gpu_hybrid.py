"""HybridEP mode on CUDA GPUs (SEMANTICS.md section 2), bit for bit.

The CUDA HybridEP kernels (csrc/kernels/cuda/hybrid_*.cu) were written and compile-checked
without a GPU; these tests are their first check:

- torch, one process per GPU (tests/mp.py, gloo bootstrap): the cases of
  tests/test_torch_hybrid.py with CUDA tensors (dynamic and static P, padding, overflow, FP8
  quantisation and e4m3 input, probs or none), forward and backward, against the NumPy reference
  and against the CPU backend run on the same inputs in the same processes; with the CPU suite's
  small buffer (FUSED_A2A_BUFFER_ROWS=8: many rounds) and the default one.
- JAX, one process driving every GPU: the suite of tests/jax_cases_hybrid.py on GPU devices
  (static P, one call per dispatch, no host sync), with the default buffer and a one-row buffer.

Skipped unless at least two CUDA GPUs are visible.
"""

from __future__ import annotations

import functools
import traceback

import numpy as np
import pytest
import reference as R
from mp import run_once, run_ranks
from reference import assert_bitwise_equal
from test_gpu_normal import GPU_ENV, _jax_suite, _need

pytestmark = pytest.mark.gpu


# ----------------------------------------------------------------------------- torch


class _CudaTorch:
    """Stands in for the torch module inside test_torch_hybrid: tensors made from NumPy arrays
    land on the current GPU; everything else is torch itself."""

    def __init__(self, torch):
        self._torch = torch

    def __getattr__(self, name):
        return getattr(self._torch, name)

    def from_numpy(self, a):
        return self._torch.from_numpy(a).cuda()


def _rank_cases(rank, world, cases):
    import test_torch_hybrid as T
    import torch
    import torch.distributed as dist

    torch.cuda.set_device(rank)
    torch.set_num_threads(1)
    tfa = T._api()
    host_from_numpy, host_torch = T.from_numpy, T.torch
    results = {}
    for case in cases:
        out = {}
        for where in ("cuda", "cpu"):
            if where == "cuda":
                T.from_numpy = lambda a: host_from_numpy(a).cuda()
                T.torch = _CudaTorch(torch)
            try:
                out[where] = T._run_case(tfa, dist.group.WORLD, rank, world, case)
            except Exception:
                out[where] = {"error": traceback.format_exc()}
            finally:
                T.from_numpy, T.torch = host_from_numpy, host_torch
            tfa.reset_hybrid_ep_buffer()
        results[case.name] = out
    return results


# Buffers: 8 tokens a round (many rounds), the default, and 8 rows with the rounds of dispatch,
# cached dispatch and combine overlapped (FUSED_A2A_HYBRID_PIPELINE=1: two half slots, round
# k + 1 sent before round k is read).
BUFFERS = {
    "rows8": {"FUSED_A2A_BUFFER_ROWS": "8"},
    "default-buffer": {},
    "rows8-pipelined": {"FUSED_A2A_BUFFER_ROWS": "8", "FUSED_A2A_HYBRID_PIPELINE": "1"},
    # the dispatch's and the combine's sending and receiving blocks at once, rows / tokens
    # tagged (session 14; bits 1 and 2): one round and many (8 rows a slot). The default at
    # G >= 4 since session 15, so "default-plain" keeps the plain rounds tested there.
    "default-plain": {"FUSED_A2A_HYBRID_OVERLAP": "0"},
    "default-overlap": {"FUSED_A2A_HYBRID_OVERLAP": "3"},
    "default-overlap-dispatch": {"FUSED_A2A_HYBRID_OVERLAP": "1"},  # which of the two fails
    "rows8-overlap": {"FUSED_A2A_BUFFER_ROWS": "8", "FUSED_A2A_HYBRID_OVERLAP": "3"},
    # the dynamic-P dispatch's host spinning on the notify kernel's ticket instead of a stream
    # sync (session 16)
    "default-spin": {"FUSED_A2A_HYBRID_NOTIFY_WAIT": "spin"},
}


def _results(world, buffer):
    import test_torch_hybrid as T

    env = dict(GPU_ENV, **BUFFERS[buffer])
    return run_once(
        ("gpu-hybrid", world, buffer),
        lambda: run_ranks(_rank_cases, world, T.WORLD_CASES[world], timeout=600, env=env),
    )


@functools.cache
def _inputs(world, case):
    import test_torch_hybrid as T

    return T.make_inputs(case, world)


def _cases():
    import test_torch_hybrid as T

    return [(w, c) for w in (2, 4) for c in T.WORLD_CASES.get(w, ())]


@pytest.mark.parametrize("buffer", list(BUFFERS))
@pytest.mark.parametrize("world,case", _cases(), ids=lambda v: getattr(v, "name", str(v)))
def test_torch_gpu_hybrid(world, case, buffer):
    _need(world)
    per_rank = [_results(world, buffer)[r][case.name] for r in range(world)]
    for r, res in enumerate(per_rank):
        for where in ("cuda", "cpu"):
            assert "error" not in res[where], f"rank {r} {where}:\n{res[where].get('error')}"
    inp = _inputs(world, case)
    gpu = [p["cuda"] for p in per_rank]
    for r, (got, exp) in enumerate(zip(gpu, inp["disp"], strict=True)):
        tag = f"rank {r} (GPU)"
        assert_bitwise_equal(got["hidden"], exp["hidden"], f"{tag} dispatched_hidden")
        if inp["probs"] is not None:
            assert_bitwise_equal(got["probs"], exp["probs"], f"{tag} dispatched_probs")
        else:
            assert got["probs_none"]
        if case.fp8:
            assert_bitwise_equal(got["scales"], exp["scaling_factor"], f"{tag} scaling_factor")
        assert_bitwise_equal(got["tpe"], exp["tokens_per_expert"], f"{tag} tokens_per_expert")
        assert_bitwise_equal(
            got["row_token"].astype(np.int64), exp["handle"]["row_token"], f"{tag} row map"
        )
        assert got["overflow"] == exp["overflow"], f"{tag} overflow flag"
        cpu = per_rank[r]["cpu"]
        for key in ("hidden", "probs", "scales", "tpe", "row_token"):
            if got.get(key) is not None:
                assert_bitwise_equal(got[key], cpu[key], f"{tag} {key} vs CPU backend")
    if case.fp8:
        return  # FP8 rows: forward only (as the CPU suite)
    outs, _ = R.hybrid_combine(inp["ys"], inp["disp"])
    dys = R.hybrid_combine_backward(inp["g_outs"], inp["disp"])
    g_probs = None if inp["probs"] is None else inp["g_probs"]
    dxs, dps = R.hybrid_dispatch_backward(inp["g_hidden"], g_probs, inp["disp"])
    for r in range(world):
        got, cpu, tag = gpu[r], per_rank[r]["cpu"], f"rank {r} (GPU)"
        assert_bitwise_equal(got["combined"], outs[r], f"{tag} combined_hidden")
        assert_bitwise_equal(got["dy"], dys[r], f"{tag} combine input grad")
        assert_bitwise_equal(got["dx"], dxs[r], f"{tag} x.grad")
        if dps is None:
            assert got["dprobs"] is None
        else:
            assert_bitwise_equal(got["dprobs"], dps[r], f"{tag} probs.grad")
        for key in ("combined", "dy", "dx"):
            assert_bitwise_equal(got[key], cpu[key], f"{tag} {key} vs CPU backend")
        if "round_trip" in got:
            assert_bitwise_equal(got["round_trip"], cpu["round_trip"], f"{tag} round trip vs CPU")


# ----------------------------------------------------------------------------- JAX


@pytest.mark.parametrize("g", [2, 4])
@pytest.mark.parametrize("rows", [None, 1], ids=["default-buffer", "one-row-buffer"])
def test_jax_gpu_hybrid_suite(g, rows):
    _need(g)
    results = _jax_suite(g, rows, suite="hybrid")
    bad = {k: v for k, v in results.items() if v != "ok"}
    assert results and not bad, "\n".join(f"{k}: {v}" for k, v in bad.items())
