"""Cross-framework parity: the same inputs through torch (gloo ranks, one process each) and JAX
(CPU devices in one process) give bitwise equal outputs and gradients."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import parity_inputs
import pytest
from mp import run_ranks
from reference import assert_bitwise_equal

HERE = os.path.dirname(os.path.abspath(__file__))


def _torch_side(rank, world, n, h, k, e, dtype_name, seed):
    import torch
    import torch.distributed as dist
    from torch_utils import from_numpy as to_torch
    from torch_utils import to_numpy

    from torch_fused_a2a import fused_combine, fused_dispatch

    inputs = parity_inputs.make(rank, n, h, k, e, dtype_name, seed)
    x = to_torch(inputs["x"]).requires_grad_(True)
    idx = torch.from_numpy(inputs["topk_idx"])
    w = torch.from_numpy(inputs["topk_weights"]).requires_grad_(True)
    recv_x, recv_idx, recv_w, per_expert, handle = fused_dispatch(x, idx, w, e, dist.group.WORLD)
    out, _ = fused_combine(recv_x, dist.group.WORLD, handle)
    loss = (out.float() * torch.from_numpy(inputs["grad_out"])).sum() + (recv_w**2).sum()
    loss.backward()
    return {
        "recv_x": to_numpy(recv_x.detach()),
        "recv_topk_idx": recv_idx.numpy(),
        "recv_topk_weights": recv_w.detach().numpy(),
        "tokens_per_expert": per_expert.numpy(),
        "out": to_numpy(out.detach()),
        "dx": to_numpy(x.grad),
        "dweights": w.grad.numpy(),
    }


def _torch_fp8_side(rank, world, n, h, k, e, seed):
    """FP8 rows through the torch op (Megatron's fused_dispatch takes one tensor)."""
    import torch
    import torch.distributed as dist

    import torch_fused_a2a as tfa

    inputs = parity_inputs.make_fp8(rank, n, h, k, e, seed)
    x = torch.from_numpy(inputs["x_bits"]).view(torch.float8_e4m3fn)
    scales = torch.from_numpy(inputs["x_scales"])
    idx = torch.from_numpy(inputs["topk_idx"])
    w = torch.from_numpy(inputs["topk_weights"])
    buf = tfa.get_buffer(dist.group.WORLD, tfa.get_hidden_bytes(x), x.device)
    recv_x, recv_s, recv_idx, recv_w, *_, per_expert = torch.ops.fused_a2a.dispatch(
        x, scales, idx, w, e, buf.group_id, buf.rank, buf.num_ranks, -1, 0
    )
    return {
        "recv_x": recv_x.view(torch.uint8).numpy(),
        "recv_x_scales": recv_s.numpy(),
        "recv_topk_idx": recv_idx.numpy(),
        "recv_topk_weights": recv_w.numpy(),
        "tokens_per_expert": per_expert.numpy(),
    }


def _jax_side(tmp_path, *args):
    npz = tmp_path / "jax.npz"
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    proc = subprocess.run(
        [sys.executable, os.path.join(HERE, "parity_jax_side.py"), *map(str, args), str(npz)],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return np.load(npz)


def test_torch_and_jax_agree_bitwise_fp8(tmp_path):
    """FP8 rows (e4m3 + 1x128 scales): the torch op and JAX's dispatch(x_scales=) deliver the same
    bytes, scales, indices, weights and counts."""
    pytest.importorskip("jax")
    g, n, h, k, e, seed = 4, 10, 256, 3, 16, 11
    jax_out = _jax_side(tmp_path, g, n, h, k, e, "e4m3", seed)
    torch_out = run_ranks(_torch_fp8_side, g, n, h, k, e, seed, timeout=180)
    for r in range(g):
        t = torch_out[r]
        m = int(jax_out[f"num_recv_{r}"][0])
        assert m == t["recv_x"].shape[0] > 0, (
            f"rank {r}: jax received {m}, torch {t['recv_x'].shape}"
        )
        for name in ("recv_x", "recv_x_scales", "recv_topk_idx", "recv_topk_weights"):
            got = jax_out[f"{name}_{r}"]
            assert_bitwise_equal(got[:m], t[name].astype(got.dtype), f"{name} rank {r}")
        np.testing.assert_array_equal(jax_out[f"tokens_per_expert_{r}"], t["tokens_per_expert"])


@pytest.mark.parametrize("dtype_name", ["bf16", "f16", "f32"])
def test_torch_and_jax_agree_bitwise(tmp_path, dtype_name):
    pytest.importorskip("jax")
    g, n, h, k, e, seed = 4, 12, 64, 3, 16, 7
    jax_out = _jax_side(tmp_path, g, n, h, k, e, dtype_name, seed)
    torch_out = run_ranks(_torch_side, g, n, h, k, e, dtype_name, seed, timeout=180)
    for r in range(g):
        # bfloat16 travels as raw uint16 bits (npz cannot hold it)
        t = {
            key: (value.view(np.uint16) if value.dtype.kind not in "iuf" else value)
            for key, value in torch_out[r].items()
        }
        m = int(jax_out[f"num_recv_{r}"][0])
        assert m == t["recv_x"].shape[0], f"rank {r}: jax received {m}, torch {t['recv_x'].shape}"
        for name in ("recv_x", "recv_topk_idx", "recv_topk_weights"):
            assert_bitwise_equal(
                jax_out[f"{name}_{r}"][:m],
                t[name].astype(jax_out[f"{name}_{r}"].dtype),
                f"{name} rank {r}",
            )
        np.testing.assert_array_equal(jax_out[f"tokens_per_expert_{r}"], t["tokens_per_expert"])
        for name in ("out", "dx", "dweights"):
            assert_bitwise_equal(jax_out[f"{name}_{r}"], t[name], f"{name} rank {r}")
