"""JAX half of tests/test_parity_hybrid.py, run in a child process with G CPU devices.

python tests/parity_hybrid_jax_side.py G CASES_JSON OUT.npz

CASES_JSON: a list of {name, n, h, l, dtype, pad, p, fp8, seed}. For each case, every rank's
dispatched rows, probs, scales, tokens_per_expert, row map, overflow flag, combine output, d hidden
(combine's backward), dx and dprobs of the loss sum(out * grad_out) + sum(dispatched_probs *
grad_probs), with out = hybrid_combine(hidden). bfloat16 / e4m3 arrays are stored as raw bits.
"""

from __future__ import annotations

import json
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


def raw(value) -> np.ndarray:
    value = np.asarray(value)
    if value.dtype.kind not in "iufb":  # bfloat16, float8_e4m3fn: npz stores them as void
        value = value.view(np.uint16 if value.dtype.itemsize == 2 else np.uint8)
    return value


def run_case(mesh, c) -> dict:
    e = G * c["l"]
    per_rank = [
        parity_inputs.make_hybrid(r, c["n"], c["h"], e, c["p"], c["dtype"], c["seed"])
        for r in range(G)
    ]
    cat = {key: np.concatenate([p[key] for p in per_rank]) for key in per_rank[0]}
    kw = dict(
        num_local_experts=c["l"], num_permuted_tokens=c["p"], pad_multiple=c["pad"],
        fp8=c["fp8"], axis_name="ep",
    )  # fmt: skip

    def step(x, rm, probs, gout, gprobs):
        d = fa.hybrid_dispatch(x, rm, probs, **kw)
        aux = dict(
            hidden=d.hidden, probs=d.probs, tpe=d.tokens_per_expert, overflow=d.overflow[None],
            row_token=d.handle.row_token,
        )  # fmt: skip
        if c["fp8"]:
            aux["scales"] = d.scaling_factor
            return jnp.zeros(()), aux
        out = fa.hybrid_combine(d.hidden, d.handle, axis_name="ep")
        aux["out"], aux["handle"] = out, d.handle
        loss = (out.astype(jnp.float32) * gout).sum() + (d.probs * gprobs).sum()
        return loss, aux

    def grads(*args):
        (_, aux), (dx, dprobs) = jax.value_and_grad(step, argnums=(0, 2), has_aux=True)(*args)
        if not c["fp8"]:
            handle = aux.pop("handle")
            _, vjp = jax.vjp(lambda y: fa.hybrid_combine(y, handle, axis_name="ep"), aux["hidden"])
            (aux["dhidden"],) = vjp(args[3].astype(aux["out"].dtype))
            aux.update(dx=dx, dprobs=dprobs)
        return aux

    fn = jax.jit(jax.shard_map(grads, mesh=mesh, in_specs=P("ep"), out_specs=P("ep")))
    names = ("x", "routing_map", "probs", "grad_out", "grad_probs")
    result = fn(*(cat[k] for k in names))
    return {k: raw(v) for k, v in result.items()}


def main() -> None:
    cases = json.loads(sys.argv[2])
    mesh = Mesh(np.array(jax.devices()[:G]), ("ep",))
    arrays = {}
    for c in cases:
        for key, value in run_case(mesh, c).items():
            for r, block in enumerate(np.split(value, G)):
                arrays[f"{c['name']}/{key}/{r}"] = block
    np.savez(sys.argv[3], **arrays)


if __name__ == "__main__":
    main()
