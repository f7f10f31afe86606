"""JAX scenarios, run in a child process with several CPU devices (see tests/test_jax_*.py).

    python tests/jax_cases.py SUITE [ARG]   ->  last stdout line: RESULTS <json {case: "ok"|error}>

The parent sets XLA_FLAGS=--xla_force_host_platform_device_count=... before this file imports jax,
so the torch tests of the same pytest session are unaffected. Every comparison is bitwise against
the NumPy reference (tests/reference.py).
"""

from __future__ import annotations

import json
import os
import sys
import traceback

import ml_dtypes
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import reference as ref  # noqa: E402

DTYPES = {"bf16": np.dtype(ml_dtypes.bfloat16), "f16": np.dtype(np.float16), "f32": np.dtype("f4")}
ROUTINGS = ("random", "empty_ranks", "all_minus1", "k1", "k8", "overflow")


def eq(a, b, name):
    if a is None:  # held by another process
        return
    ref.assert_bitwise_equal(np.asarray(a), np.asarray(b), name)


def make_inputs(g, n, h, k, num_local, dtype, routing, seed):
    """Per-rank lists xs [N,H], idxs [N,K] int32 (distinct experts per token), ws [N,K] f32."""
    rng = np.random.default_rng(seed)
    e = g * num_local
    if routing == "empty_ranks":  # only experts of even ranks: odd ranks receive nothing
        pool = np.array([x for x in range(e) if (x // num_local) % 2 == 0])
    elif routing == "overflow":  # most tokens to rank 0's experts
        pool = np.arange(num_local)
    else:
        pool = np.arange(e)
    xs, idxs, ws = [], [], []
    for _ in range(g):
        xs.append(rng.standard_normal((n, h)).astype(np.float32).astype(dtype))
        idx = np.stack([rng.permutation(pool)[:k] for _ in range(n)]).astype(np.int32)
        if routing == "all_minus1":
            idx[:] = -1
        elif routing != "overflow":
            idx[rng.random(idx.shape) < 0.2] = -1
        idxs.append(idx)
        ws.append(rng.random((n, k)).astype(np.float32))
    return xs, idxs, ws


def split(a, g):
    """Per-rank blocks of a global array sharded on its first axis; None for blocks this process
    does not hold (multi-process runs)."""
    if getattr(a, "is_fully_addressable", True):
        a = np.asarray(a)
        return list(a.reshape((g, a.shape[0] // g) + a.shape[1:]))
    rows = a.shape[0] // g
    out = [None] * g
    for shard in a.addressable_shards:
        start = shard.index[0].start or 0
        data = np.asarray(shard.data)
        for i in range(data.shape[0] // rows):
            out[start // rows + i] = data[i * rows : (i + 1) * rows]
    return out


def to_global(mesh, a, spec=None):
    """A global array sharded over the mesh's first-axis spec (works with several processes)."""
    import jax
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    a = np.asarray(a)
    spec = spec or P(tuple(mesh.axis_names) if len(mesh.axis_names) > 1 else mesh.axis_names[0])
    return jax.make_array_from_callback(a.shape, NamedSharding(mesh, spec), lambda i: a[i])


def run_normal_case(mesh, case):
    """Forward, both VJPs and value_and_grad of one routing/dtype against the reference."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import PartitionSpec as P

    import jax_fused_a2a as fa

    g = mesh.devices.size
    assert mesh.axis_names == ("ep",)
    dtype = DTYPES[case["dtype"]]
    routing = case["routing"]
    k = {"k1": 1, "k8": 8}.get(routing, 2)
    num_local = 8 if k == 8 else 3
    n, h, e = case.get("n", 24), case.get("h", 32), g * num_local
    cap = case.get("capacity")
    if routing == "overflow" and cap is None:
        cap = max(1, n // 2)
    xs, idxs, ws = make_inputs(g, n, h, k, num_local, dtype, routing, case["seed"])
    c = g * n if cap is None else cap
    rng = np.random.default_rng(case["seed"] + 1)
    g_rx = [rng.standard_normal((c, h)).astype(np.float32).astype(dtype) for _ in range(g)]
    g_rw = [rng.standard_normal((c, k)).astype(np.float32) for _ in range(g)]
    g_out = [rng.standard_normal((n, h)).astype(np.float32).astype(dtype) for _ in range(g)]
    c3 = [rng.standard_normal((c, k)).astype(np.float32) for _ in range(g)]

    kw = dict(num_experts=e, axis_name="ep", max_recv_tokens=cap)
    scale = jnp.asarray(1.5, dtype)

    def body(x, idx, w, grx, grw, gout, cc3):
        d = fa.dispatch(x, idx, w, **kw)
        y = d.recv_x * scale
        out = fa.combine(y, d.handle, axis_name="ep")
        _, vjp_d = jax.vjp(lambda x_, w_: fa.dispatch(x_, idx, w_, **kw)[0:3:2], x, w)
        dx, dw = vjp_d((grx, grw))
        _, vjp_c = jax.vjp(lambda y_: fa.combine(y_, d.handle, axis_name="ep"), y)
        (dy,) = vjp_c(gout)

        def loss(x_, w_):  # linear, so the gradient is exact: see the reference composition
            dd = fa.dispatch(x_, idx, w_, **kw)
            o = fa.combine(dd.recv_x, dd.handle, axis_name="ep")
            return jnp.sum(o.astype(jnp.float32) * gout.astype(jnp.float32)) + jnp.sum(
                dd.recv_topk_weights * cc3
            )

        _, (gx, gw) = jax.value_and_grad(loss, argnums=(0, 1))(x, w)
        scalars = jnp.stack([d.num_recv_tokens, d.num_dropped])
        return (
            d.recv_x,
            d.recv_topk_idx,
            d.recv_topk_weights,
            d.tokens_per_expert,
            scalars,
            y,
            out,
            dx,
            dw,
            dy,
            gx,
            gw,
        )

    spec = P("ep")
    f = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=(spec,) * 7, out_specs=(spec,) * 12))
    args = (np.concatenate(a) for a in (xs, idxs, ws, g_rx, g_rw, g_out, c3))
    outs = f(*(to_global(mesh, a) for a in args))
    rx, ridx, rw, tpe, sc, y, out, dx, dw, dy, gx, gw = (split(o, g) for o in outs)

    res = ref.dispatch(xs, idxs, ws, e, capacity=c)
    for r in range(g):
        eq(rx[r], res[r]["recv_x"], f"recv_x[{r}]")
        eq(ridx[r], res[r]["recv_topk_idx"].astype(np.int32), f"recv_topk_idx[{r}]")
        eq(rw[r], res[r]["recv_topk_weights"], f"recv_topk_weights[{r}]")
        eq(tpe[r], res[r]["tokens_per_expert"].astype(np.int32), f"tokens_per_expert[{r}]")
        eq(
            sc[r],
            np.array([res[r]["num_recv"], res[r]["num_dropped"]], np.int32),
            f"num_recv_tokens/num_dropped[{r}]",
        )
    ys = [(r["recv_x"].astype(np.float32) * np.float32(1.5)).astype(dtype) for r in res]
    for r in range(g):
        eq(y[r], ys[r], f"expert output y[{r}]")
    ref_out, _ = ref.combine(ys, res, [n] * g)
    ref_dx, ref_dw = ref.dispatch_backward(g_rx, g_rw, res, idxs)
    ref_dy = ref.combine_backward(g_out, res)
    dy_loss = ref.combine_backward(g_out, res)  # d recv_x of the linear loss
    ref_gx, ref_gw = ref.dispatch_backward(dy_loss, c3, res, idxs)
    for r in range(g):
        eq(out[r], ref_out[r], f"combine out[{r}]")
        eq(dx[r], ref_dx[r], f"dispatch vjp dx[{r}]")
        eq(dw[r], ref_dw[r], f"dispatch vjp dtopk_weights[{r}]")
        eq(dy[r], ref_dy[r], f"combine vjp dy[{r}]")
        eq(gx[r], ref_gx[r], f"value_and_grad dx[{r}]")
        eq(gw[r], ref_gw[r], f"value_and_grad dtopk_weights[{r}]")
    if routing == "overflow":
        assert sum(x["num_dropped"] for x in res) > 0, "overflow case dropped nothing"
    if routing == "empty_ranks" and g > 1:
        assert res[1]["num_recv"] == 0, "rank 1 should receive nothing"


def run_fp8_case(mesh, case):
    """FP8 rows (e4m3 + 1x128 f32 scales, tests/reference.py's quantisation): rows and scales
    moved bit for bit, and the straight-through backward (d recv_x combined in bfloat16, rounded
    to e4m3; the scales get no gradient)."""
    import jax
    from jax.sharding import PartitionSpec as P

    import jax_fused_a2a as fa

    g = mesh.devices.size
    routing, k, num_local = case["routing"], 2, 3
    n, h, e, cap = case.get("n", 20), 256, g * num_local, case.get("capacity")
    if routing == "overflow" and cap is None:
        cap = max(1, n // 2)
    xs, idxs, ws = make_inputs(g, n, h, k, num_local, DTYPES["bf16"], routing, case["seed"])
    quantised = [ref.fp8_quantize(x) for x in xs]
    xq, xs_scales = [q for q, _ in quantised], [s for _, s in quantised]
    c = g * n if cap is None else cap
    rng = np.random.default_rng(case["seed"] + 1)
    e4m3 = np.dtype(ml_dtypes.float8_e4m3fn)
    g_rx = [(rng.standard_normal((c, h)) * 0.5).astype(np.float32).astype(e4m3) for _ in range(g)]
    g_rw = [rng.standard_normal((c, k)).astype(np.float32) for _ in range(g)]
    kw = dict(num_experts=e, axis_name="ep", max_recv_tokens=cap)

    def body(x, sc, idx, w, grx, grw):
        d = fa.dispatch(x, idx, w, x_scales=sc, **kw)
        _, vjp = jax.vjp(
            lambda x_, s_, w_: fa.dispatch(x_, idx, w_, x_scales=s_, **kw)[0:3:2], x, sc, w
        )
        dx, dsc, dw = vjp((grx, grw))
        return d.recv_x, d.recv_x_scales, d.recv_topk_idx, d.recv_topk_weights, dx, dsc, dw

    spec = P("ep")
    f = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=(spec,) * 6, out_specs=(spec,) * 7))
    args = (np.concatenate(a) for a in (xq, xs_scales, idxs, ws, g_rx, g_rw))
    outs = f(*(to_global(mesh, a) for a in args))
    rx, rsc, ridx, rw, dx, dsc, dw = (split(o, g) for o in outs)
    res = ref.dispatch(quantised, idxs, ws, e, capacity=c)  # recv_x: (data, scales)
    g_rx_bf16 = [a.astype(np.float32).astype(DTYPES["bf16"]) for a in g_rx]
    ref_dx, ref_dw = ref.dispatch_backward(g_rx_bf16, g_rw, res, idxs)
    for r in range(g):
        eq(rx[r], res[r]["recv_x"][0], f"fp8 recv_x[{r}]")
        eq(rsc[r], res[r]["recv_x"][1], f"fp8 recv_x_scales[{r}]")
        eq(ridx[r], res[r]["recv_topk_idx"].astype(np.int32), f"recv_topk_idx[{r}]")
        eq(rw[r], res[r]["recv_topk_weights"], f"recv_topk_weights[{r}]")
        eq(dx[r], ref_dx[r].astype(e4m3), f"fp8 straight-through dx[{r}]")
        eq(dsc[r], np.zeros_like(xs_scales[r]), f"fp8 d x_scales[{r}]")
        eq(dw[r], ref_dw[r], f"dispatch vjp dtopk_weights[{r}]")
    if routing == "overflow":
        assert sum(x["num_dropped"] for x in res) > 0, "overflow case dropped nothing"


def normal_cases(g):
    cases = {}
    seed = 100 * g
    for dt in DTYPES:
        for routing in ROUTINGS:
            seed += 1
            cases[f"G{g}-{dt}-{routing}"] = dict(dtype=dt, routing=routing, seed=seed)
    # several exchange rounds (the CPU buffer holds 256 rows per slot by default)
    cases[f"G{g}-bf16-many-rounds"] = dict(dtype="bf16", routing="random", seed=seed + 1, n=300)
    cases[f"G{g}-f32-capacity-exact"] = dict(
        dtype="f32", routing="random", seed=seed + 2, capacity=24
    )
    for i, routing in enumerate(("random", "overflow")):  # FP8 rows: run_fp8_case
        cases[f"G{g}-e4m3-{routing}"] = dict(fp8=True, routing=routing, seed=seed + 3 + i)
    return cases


def suite_normal(g):
    import jax
    from jax.sharding import Mesh

    mesh = Mesh(np.array(jax.devices()[:g]), ("ep",))
    results = {}
    for name, case in normal_cases(g).items():
        results[name] = _run(run_fp8_case if case.get("fp8") else run_normal_case, mesh, case)
    return results


def _run(fn, *args):
    try:
        fn(*args)
        return "ok"
    except BaseException as e:  # report everything, keep going
        return f"{type(e).__name__}: {e}\n{traceback.format_exc()[-3000:]}"


def main():
    suite = sys.argv[1]
    if suite == "normal":
        results = suite_normal(int(sys.argv[2]))
    else:
        import jax_cases_hybrid
        import jax_cases_misc

        suites = {**jax_cases_misc.SUITES, **jax_cases_hybrid.SUITES}
        results = suites[suite](*sys.argv[2:])
    print("RESULTS " + json.dumps(results), flush=True)


if __name__ == "__main__":
    main()
