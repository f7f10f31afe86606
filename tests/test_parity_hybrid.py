"""Cross-framework parity, HybridEP mode: the same inputs through torch_fused_a2a
(HybridEPDispatch / HybridEPCombine on gloo ranks, one process each) and jax_fused_a2a
(hybrid_dispatch / hybrid_combine on CPU devices of one process) give bitwise equal permuted rows,
probs, FP8 rows and scales, tokens_per_expert, row maps, overflow flags, combine outputs and
gradients (d hidden through combine, dx and dprobs through dispatch). Both sides use the same
static num_permuted_tokens (with slack, exact, overflowing)."""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys

import numpy as np
import parity_inputs
import pytest
import reference as ref
from mp import run_ranks
from reference import assert_bitwise_equal

HERE = os.path.dirname(os.path.abspath(__file__))
G = 4
# name, N, H, L, dtype, pad_multiple, size of P, fp8, seed
CASES = [
    ("bf16-pad16-slack", 13, 128, 2, "bf16", 16, "slack", False, 1),
    ("f16-nopad-overflow", 17, 64, 3, "f16", None, "overflow", False, 2),
    ("f32-pad64-exact", 9, 64, 2, "f32", 64, "exact", False, 3),
    ("bf16-pad16-fp8", 11, 256, 2, "bf16", 16, "slack", True, 4),
]


def _num_permuted_tokens(n, h, el, dtype, pad, size, seed) -> int:
    e = G * el
    per_rank = [parity_inputs.make_hybrid(r, n, h, e, 0, dtype, seed) for r in range(G)]
    disp = ref.hybrid_dispatch(
        [p["x"] for p in per_rank], [p["routing_map"] for p in per_rank],
        [p["probs"] for p in per_rank], el, pad,
    )  # fmt: skip
    needed = [d["handle"]["num_real_rows"] for d in disp]
    return {"slack": max(needed) + 7, "exact": max(needed), "overflow": min(needed) - 4}[size]


@functools.cache
def _cases() -> list[dict]:
    out = []
    for name, n, h, el, dtype, pad, size, fp8, seed in CASES:
        p = _num_permuted_tokens(n, h, el, dtype, pad, size, seed)
        out.append(dict(name=name, n=n, h=h, l=el, dtype=dtype, pad=pad, p=p, fp8=fp8, seed=seed))
    return out


def _raw(t) -> np.ndarray:
    import torch
    from torch_utils import to_numpy

    if t.dtype == torch.float8_e4m3fn:
        return t.detach().contiguous().view(torch.uint8).numpy().copy()
    value = to_numpy(t)
    return value.view(np.uint16) if value.dtype.kind not in "iufb" else value


def _torch_side(rank, world, cases):
    import torch
    import torch.distributed as dist
    from torch_utils import from_numpy

    import torch_fused_a2a as tfa

    torch.set_num_threads(1)
    group, results = dist.group.WORLD, {}
    for c in cases:
        inp = parity_inputs.make_hybrid(
            rank, c["n"], c["h"], world * c["l"], c["p"], c["dtype"], c["seed"]
        )
        if c["fp8"]:
            tfa.init_hybrid_ep_buffer(group, c["h"], c["n"], c["l"], 24, 24, True)
        x = from_numpy(inp["x"]).requires_grad_()
        probs = torch.from_numpy(inp["probs"]).requires_grad_()
        rm = torch.from_numpy(inp["routing_map"])
        hidden, dprobs, scales, tpe, handle = tfa.hybrid_ep_dispatch(
            x, rm, probs, group, c["l"], 24, 24, c["p"], c["pad"]
        )
        res = dict(
            hidden=_raw(hidden), probs=_raw(dprobs), tpe=tpe.numpy().astype(np.int32),
            row_token=handle.row_token.numpy(), overflow=np.array([handle.overflow]),
        )  # fmt: skip
        if c["fp8"]:
            res["scales"] = _raw(scales)
            tfa.reset_hybrid_ep_buffer()
        else:
            hidden.retain_grad()
            out = tfa.hybrid_ep_combine(hidden, handle, c["p"], c["pad"])
            grad_out = torch.from_numpy(inp["grad_out"])
            loss = (out.float() * grad_out).sum() + (
                dprobs * torch.from_numpy(inp["grad_probs"])
            ).sum()
            loss.backward()
            res.update(out=_raw(out), dhidden=_raw(hidden.grad), dx=_raw(x.grad))
            res["dprobs"] = _raw(probs.grad)
        results[c["name"]] = res
    return results


@functools.cache
def _jax_results(tmp_dir: str) -> dict:
    npz = os.path.join(tmp_dir, "jax_hybrid.npz")
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    proc = subprocess.run(
        [sys.executable, os.path.join(HERE, "parity_hybrid_jax_side.py"), str(G),
         json.dumps(_cases()), npz],
        capture_output=True, text=True, timeout=300, env=env,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return dict(np.load(npz))


@functools.cache
def _torch_results() -> list:
    return run_ranks(_torch_side, G, _cases(), timeout=300, env={"FUSED_A2A_BUFFER_ROWS": "8"})


@pytest.mark.parametrize("name", [c[0] for c in CASES])
def test_torch_and_jax_hybrid_agree_bitwise(tmp_path_factory, name):
    pytest.importorskip("jax")
    case = next(c for c in _cases() if c["name"] == name)
    jax_out = _jax_results(str(tmp_path_factory.getbasetemp()))
    torch_out = _torch_results()
    keys = ["hidden", "probs", "tpe", "row_token", "overflow"]
    keys += ["scales"] if case["fp8"] else ["out", "dhidden", "dx", "dprobs"]
    if case["name"].endswith("overflow"):
        assert any(t[name]["overflow"][0] for t in torch_out), "nothing overflowed"
    for r in range(G):
        for key in keys:
            got, want = jax_out[f"{name}/{key}/{r}"], torch_out[r][name][key]
            assert_bitwise_equal(got, want.astype(got.dtype), f"{name} {key} rank {r}")
