"""Train the MoE block of moe_common.py with expert parallelism in JAX: jax.jit + jax.shard_map
over an "ep" mesh axis, fused_a2a dispatch/combine (normal mode) or hybrid_dispatch/
hybrid_combine (HybridEP mode), plain SGD.

    python examples/moe_jax.py [--ranks G] [--steps 300] [--mode normal|hybrid|all] [--out DIR]

Runs on CPU devices by default (G of them, through XLA_FLAGS) and on all GPUs when a CUDA build
of fused_a2a sees at least two. Writes DIR/jax_<mode>.json with the loss of every step.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import moe_common as mc  # noqa: E402


def _setup_platform(ranks: int, device: str) -> None:
    """Must run before jax is imported."""
    if device == "cpu":
        os.environ["JAX_PLATFORMS"] = "cpu"
        flags = [
            f
            for f in os.environ.get("XLA_FLAGS", "").split()
            if not f.startswith("--xla_force_host_platform_device_count")
        ]
        flags.append(f"--xla_force_host_platform_device_count={ranks}")
        os.environ["XLA_FLAGS"] = " ".join(flags)
    else:
        os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")


def build_step(cfg: dict, mode: str, mesh):
    """The jitted SGD step: (replicated params, expert params, x, target) -> (new params, loss)."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import PartitionSpec as P

    import jax_fused_a2a as fa

    g, n, d = cfg["ranks"], cfg["tokens"], cfg["d_model"]
    e, el, k = cfg["experts"], cfg["experts_per_rank"], cfg["topk"]
    bsz, seq = cfg["batch"], cfg["seq"]
    if hasattr(fa, "max_permuted_tokens"):
        rows = fa.max_permuted_tokens(n, g, el)
    else:
        rows = g * n * min(k, el)

    def rms(x, gain):
        return x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + 1e-6) * gain

    def attention(x, p):
        q, kk, v = ((x @ p[name]).reshape(bsz, seq, d) for name in ("wq", "wk", "wv"))
        scores = q @ kk.transpose(0, 2, 1) / jnp.sqrt(jnp.float32(d))
        causal = jnp.tril(jnp.ones((seq, seq), bool))
        scores = jnp.where(causal, scores, jnp.float32(-1e30))
        return (jax.nn.softmax(scores, axis=-1) @ v).reshape(bsz * seq, d) @ p["wo"]

    def expert(u, w1, w2):
        return jax.nn.silu(u @ w1) @ w2

    def moe(u, probs, ex):
        weights, idx = jax.lax.top_k(probs, k)
        if mode == "normal":
            dd = fa.dispatch(u, idx, weights, num_experts=e, axis_name="ep")
            y = jnp.zeros_like(dd.recv_x)
            for j in range(el):
                gate = jnp.where(dd.recv_topk_idx == j, dd.recv_topk_weights, 0.0)
                y = y + gate.sum(-1, keepdims=True) * expert(dd.recv_x, ex["w1"][j], ex["w2"][j])
            return fa.combine(y, dd.handle, axis_name="ep")
        routing_map = jax.nn.one_hot(idx, e, dtype=jnp.int32).sum(axis=1) > 0
        dense_probs = jnp.where(routing_map, probs, 0.0)
        dd = fa.hybrid_dispatch(
            u,
            routing_map,
            dense_probs,
            num_local_experts=el,
            num_permuted_tokens=rows,
            axis_name="ep",
        )
        ends = jnp.cumsum(dd.tokens_per_expert)
        row_expert = jnp.sum(jnp.arange(rows)[:, None] >= ends[None, :], axis=1)
        y = jnp.zeros_like(dd.hidden)
        for j in range(el):
            out_j = dd.probs[:, None] * expert(dd.hidden, ex["w1"][j], ex["w2"][j])
            y = y + jnp.where((row_expert == j)[:, None], out_j, 0.0)
        return fa.hybrid_combine(y, dd.handle, axis_name="ep")

    def local_loss(rep, ex, x, target):
        h = x + attention(rms(x, rep["g1"]), rep)
        u = rms(h, rep["g2"])
        probs = jax.nn.softmax(u @ rep["wr"], axis=-1)
        y = (h + moe(u, probs, ex)) @ rep["wout"]
        return jax.lax.psum(jnp.sum((y - target) ** 2) / (g * n * d), "ep")

    loss_fn = jax.shard_map(
        local_loss, mesh=mesh, in_specs=(P(), P("ep"), P("ep"), P("ep")), out_specs=P()
    )
    lr = cfg["lr"]

    @jax.jit
    def step(rep, ex, x, target):
        loss, (g_rep, g_ex) = jax.value_and_grad(loss_fn, argnums=(0, 1))(rep, ex, x, target)
        rep = jax.tree.map(lambda p, gr: p - lr * gr, rep, g_rep)
        ex = jax.tree.map(lambda p, gr: p - lr * gr, ex, g_ex)
        return rep, ex, loss

    return step


def train(cfg: dict, mode: str, steps: int, log_every: int = 50) -> list[float]:
    import jax
    import numpy as np
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    mesh = Mesh(np.array(jax.devices()[: cfg["ranks"]]), ("ep",))
    params = mc.init_params(cfg)
    rep = {
        k: jax.device_put(v, NamedSharding(mesh, P()))
        for k, v in params.items()
        if k not in mc.EXPERT_PARAMS
    }
    ex = {k: jax.device_put(params[k], NamedSharding(mesh, P("ep"))) for k in mc.EXPERT_PARAMS}
    step = build_step(cfg, mode, mesh)
    data = NamedSharding(mesh, P("ep"))
    losses = []
    t0 = time.perf_counter()
    for i in range(steps):
        x, target = mc.batch(cfg, i)
        rep, ex, loss = step(rep, ex, jax.device_put(x, data), jax.device_put(target, data))
        losses.append(float(loss))
        if log_every and (i % log_every == 0 or i == steps - 1):
            print(
                f"jax {mode} step {i:4d} loss {losses[-1]:.6f} ({time.perf_counter() - t0:.1f} s)",
                flush=True,
            )
    return losses


def parse(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ranks", type=int, default=0, help="EP size (default: all GPUs, or 4)")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--mode", choices=["normal", "hybrid", "all"], default="all")
    parser.add_argument("--device", choices=["auto", "cpu"], default="auto")
    parser.add_argument("--lr", type=float, default=None)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--out", default="examples_out")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse(argv)
    ranks, device = mc.default_ranks()
    if args.device == "cpu":
        ranks, device = 4, "cpu"
    ranks = args.ranks or ranks
    _setup_platform(ranks, device)
    import jax

    jax.config.update("jax_default_matmul_precision", "highest")  # no TF32: fp32 parity
    import jax_fused_a2a as fa

    cfg = mc.config(ranks, lr=args.lr, seed=args.seed)
    for mode in ("normal", "hybrid") if args.mode == "all" else (args.mode,):
        path = os.path.join(args.out, f"jax_{mode}.json")
        if mode == "hybrid" and not hasattr(fa, "hybrid_dispatch"):
            print("jax hybrid: unsupported (jax_fused_a2a has no hybrid_dispatch)")
            continue
        try:
            losses = train(cfg, mode, args.steps)
        except Exception as err:  # noqa: BLE001 - e.g. HybridEP not on this backend yet
            if "UNIMPLEMENTED" in str(err) or isinstance(err, NotImplementedError):
                print(f"jax {mode}: unsupported here: {str(err).splitlines()[0][:300]}")
                continue
            raise
        mc.save_curve(path, "jax", mode, cfg, losses, jax.devices()[0].platform)
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
