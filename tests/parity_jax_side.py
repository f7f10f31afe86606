"""JAX half of tests/test_parity.py, run in a child process with G CPU devices.

python tests/parity_jax_side.py G N H K E DTYPE SEED OUT.npz
"""

from __future__ import annotations

import os
import sys

G = int(sys.argv[1])
os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={G}"

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import Mesh  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import parity_inputs  # noqa: E402

import jax_fused_a2a as fa  # noqa: E402


def _save(out_path, names, result) -> None:
    arrays = {}
    for name, value in zip(names, result, strict=True):
        value = np.asarray(value)
        if value.dtype.itemsize == 2 and value.dtype.kind not in "iuf":
            value = value.view(np.uint16)  # bfloat16: npz stores it as raw void
        for r, block in enumerate(np.split(value, G)):
            arrays[f"{name}_{r}"] = block
    np.savez(out_path, **arrays)


def main_fp8(n, h, k, e, seed, out_path) -> None:
    """FP8 rows (dtype "e4m3"): the forward outputs, e4m3 rows as their uint8 bits."""
    per_rank = [parity_inputs.make_fp8(r, n, h, k, e, seed) for r in range(G)]
    cat = {key: np.concatenate([p[key] for p in per_rank]) for key in per_rank[0]}
    mesh = Mesh(np.array(jax.devices()[:G]), ("ep",))

    def step(bits, scales, idx, w):
        x = jax.lax.bitcast_convert_type(bits, jnp.float8_e4m3fn)
        d = fa.dispatch(x, idx, w, num_experts=e, axis_name="ep", x_scales=scales)
        rows = jax.lax.bitcast_convert_type(d.recv_x, jnp.uint8)
        return (rows, d.recv_x_scales, d.recv_topk_idx, d.recv_topk_weights, d.tokens_per_expert,
                d.num_recv_tokens[None])  # fmt: skip

    fn = jax.jit(jax.shard_map(step, mesh=mesh, in_specs=P("ep"), out_specs=P("ep")))
    result = fn(cat["x_bits"], cat["x_scales"], cat["topk_idx"], cat["topk_weights"])
    names = ("recv_x", "recv_x_scales", "recv_topk_idx", "recv_topk_weights",
             "tokens_per_expert", "num_recv")  # fmt: skip
    _save(out_path, names, result)


def main() -> None:
    _, _, n, h, k, e, dtype_name, seed, out_path = sys.argv
    n, h, k, e, seed = int(n), int(h), int(k), int(e), int(seed)
    if dtype_name == "e4m3":
        main_fp8(n, h, k, e, seed, out_path)
        return
    per_rank = [parity_inputs.make(r, n, h, k, e, dtype_name, seed) for r in range(G)]
    cat = {key: np.concatenate([p[key] for p in per_rank]) for key in per_rank[0]}
    mesh = Mesh(np.array(jax.devices()[:G]), ("ep",))

    def step(x, idx, w, gout):
        d = fa.dispatch(x, idx, w, num_experts=e, axis_name="ep")
        out = fa.combine(d.recv_x, d.handle, axis_name="ep")
        loss = (out.astype(jnp.float32) * gout).sum() + (d.recv_topk_weights**2).sum()
        return loss, (
            d.recv_x,
            d.recv_topk_idx,
            d.recv_topk_weights,
            d.tokens_per_expert,
            d.num_recv_tokens[None],
            out,
        )

    def grads(x, idx, w, gout):
        (_, aux), (dx, dw) = jax.value_and_grad(step, argnums=(0, 2), has_aux=True)(x, idx, w, gout)
        return aux + (dx, dw)

    fn = jax.jit(jax.shard_map(grads, mesh=mesh, in_specs=P("ep"), out_specs=P("ep")))
    result = fn(cat["x"], cat["topk_idx"], cat["topk_weights"], cat["grad_out"])
    names = (
        "recv_x",
        "recv_topk_idx",
        "recv_topk_weights",
        "tokens_per_expert",
        "num_recv",
        "out",
        "dx",
        "dweights",
    )
    _save(out_path, names, result)


if __name__ == "__main__":
    main()
