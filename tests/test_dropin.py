"""Drop-in: code written for ``nemo_automodel.components.moe.megatron.fused_a2a`` (and Megatron's
``megatron.core.transformer.moe.fused_a2a``) runs unchanged on torch_fused_a2a with only the import
swapped. tests/dropin_upstream_code.py is such code (AutoModel's GroupedExpertsDeepEP flow and the
HybridEP flow); here a module alias makes its import resolve to torch_fused_a2a, and a router +
expert layer runs forward and backward on 2 gloo ranks against a dense single-process computation
(fp32 tolerance), gradients included (x, router, both expert weights).
"""

from __future__ import annotations

import sys
import types

import numpy as np
import pytest
from mp import run_ranks

UPSTREAM_MODULES = (
    "nemo_automodel.components.moe.megatron.fused_a2a",
    "megatron.core.transformer.moe.fused_a2a",
)
G, N, H, F_, E, K = 2, 24, 32, 48, 8, 3  # ranks, tokens per rank, dim, inter dim, experts, top-k
L = E // G


def install_import_swap() -> None:
    """`import <upstream>.fused_a2a` gives torch_fused_a2a (what a user does with one line)."""
    import torch_fused_a2a

    for name in UPSTREAM_MODULES:
        parts = name.split(".")
        for i in range(1, len(parts)):
            pkg = ".".join(parts[:i])
            if pkg not in sys.modules:
                module = types.ModuleType(pkg)
                module.__path__ = []
                sys.modules[pkg] = module
            if i > 1:
                setattr(sys.modules[".".join(parts[: i - 1])], parts[i - 1], sys.modules[pkg])
        sys.modules[name] = torch_fused_a2a
        setattr(sys.modules[".".join(parts[:-1])], parts[-1], torch_fused_a2a)


def _inputs():
    rng = np.random.default_rng(5)
    return {
        "x": rng.standard_normal((G * N, H)).astype(np.float32),
        "wr": (rng.standard_normal((H, E)) / np.sqrt(H)).astype(np.float32),
        "w1": (rng.standard_normal((E, H, F_)) / np.sqrt(H)).astype(np.float32),
        "w2": (rng.standard_normal((E, F_, H)) / np.sqrt(F_)).astype(np.float32),
        "mask": rng.random(G * N) > 0.15,  # some tokens masked: all their indices become -1
        "gout": rng.standard_normal((G * N, H)).astype(np.float32),
    }


def _router(x, wr):
    import torch

    scores = torch.softmax(x @ wr, dim=-1)
    weights, indices = torch.topk(scores, K, dim=-1)
    return weights, indices


def _dense(inp):
    """Single process, no communication: every token through its k experts."""
    import torch

    t = {k: torch.tensor(v) for k, v in inp.items()}
    x, wr, w1, w2 = (t[k].requires_grad_(True) for k in ("x", "wr", "w1", "w2"))
    weights, indices = _router(x, wr)
    indices = indices.masked_fill(~t["mask"].unsqueeze(-1), -1)
    y = torch.zeros_like(x)
    for k in range(K):
        for e in range(E):
            sel = indices[:, k] == e
            out = (torch.nn.functional.silu(x[sel] @ w1[e]) * weights[sel, k, None]) @ w2[e]
            y = y.index_add(0, sel.nonzero()[:, 0], out)
    (y * t["gout"]).sum().backward()
    return {
        "y": y.detach().numpy(),
        "dx": x.grad.numpy(),
        "dwr": wr.grad.numpy(),
        "dw1": w1.grad.numpy(),
        "dw2": w2.grad.numpy(),
    }


def _rank(rank, world, flow, pad_multiple, inp, int_count=False, steps=2):
    import torch
    import torch.distributed as dist

    install_import_swap()
    import dropin_upstream_code as upstream
    import nemo_automodel.components.moe.megatron.fused_a2a as fused_a2a
    from megatron.core.transformer.moe.fused_a2a import fused_dispatch

    import torch_fused_a2a

    assert fused_a2a is torch_fused_a2a and fused_dispatch is torch_fused_a2a.fused_dispatch
    group = dist.group.WORLD
    rows = slice(rank * N, (rank + 1) * N)
    experts = slice(rank * L, (rank + 1) * L)
    if flow == "deepep":
        dispatcher = upstream.DeepEPDispatcher(group, E, L, K)
    else:
        upstream.hybrid_init(group, H, N, L)
        cls = upstream.HybridEPDispatcher
        if int_count:

            class IntCount(upstream.HybridEPDispatcher):
                """Passes num_permuted_tokens to hybrid_ep_combine as an int (see below)."""

                def combine(self, hidden_states):
                    self.num_permuted_tokens = int(self.num_permuted_tokens)
                    return super().combine(hidden_states)

            cls = IntCount
        dispatcher = cls(group, E, L, pad_multiple=pad_multiple)
    layer = upstream.GroupedExperts(
        torch.tensor(inp["w1"][experts]), torch.tensor(inp["w2"][experts]), dispatcher
    )
    wr = torch.tensor(inp["wr"], requires_grad=True)
    out = {}
    for _ in range(steps):  # the same step twice: buffers and handles are reused cleanly
        layer.zero_grad()
        wr.grad = None
        x = torch.tensor(inp["x"][rows], requires_grad=True)
        weights, indices = _router(x, wr)
        y = layer(x, torch.tensor(inp["mask"][rows]), weights, indices)
        (y * torch.tensor(inp["gout"][rows])).sum().backward()
        dist.all_reduce(wr.grad)  # the router is replicated: its gradient is summed over ranks
        out = {
            "y": y.detach().numpy(),
            "dx": x.grad.numpy(),
            "dwr": wr.grad.numpy(),
            "dw1": layer.w1.grad.numpy(),
            "dw2": layer.w2.grad.numpy(),
        }
    module = sys.modules[UPSTREAM_MODULES[0]]
    out["buffer"] = (
        module._buffer is not None if flow == "deepep" else (module._hybrid_ep_buffer is not None)
    )
    return out


def _check(results, dense):
    for r, res in enumerate(results):
        rows, experts = slice(r * N, (r + 1) * N), slice(r * L, (r + 1) * L)
        assert res["buffer"]
        tol = dict(rtol=2e-5, atol=2e-6)
        np.testing.assert_allclose(res["y"], dense["y"][rows], **tol, err_msg=f"rank {r} y")
        np.testing.assert_allclose(res["dx"], dense["dx"][rows], **tol, err_msg=f"rank {r} dx")
        np.testing.assert_allclose(res["dwr"], dense["dwr"], **tol, err_msg=f"rank {r} d router")
        np.testing.assert_allclose(res["dw1"], dense["dw1"][experts], **tol, err_msg=f"rank {r}")
        np.testing.assert_allclose(res["dw2"], dense["dw2"][experts], **tol, err_msg=f"rank {r}")
        for key in ("dx", "dwr", "dw1", "dw2"):
            assert np.abs(res[key]).sum() > 0, f"rank {r}: no gradient reached {key}"


@pytest.fixture(scope="module")
def dense():
    inp = _inputs()
    return inp, _dense(inp)


def test_deepep_flow(dense):
    inp, want = dense
    _check(run_ranks(_rank, G, "deepep", None, inp, timeout=180), want)


def test_hybridep_flow_as_upstream(dense):
    inp, want = dense
    _check(run_ranks(_rank, G, "hybrid", None, inp, False, timeout=180), want)


@pytest.mark.parametrize("pad_multiple", [None, 16])
def test_hybridep_flow(dense, pad_multiple):
    """The HybridEP flow with the one difference of the test above: the count as an int."""
    inp, want = dense
    _check(run_ranks(_rank, G, "hybrid", pad_multiple, inp, True, timeout=180), want)
