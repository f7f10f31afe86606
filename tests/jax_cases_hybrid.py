"""JAX HybridEP scenarios (hybrid_dispatch / hybrid_combine), bit for bit against the NumPy
reference, run by tests/jax_cases.py in a child process with several CPU devices:

    python tests/jax_cases.py hybrid G         the forward/backward matrix on G devices
    python tests/jax_cases.py hybrid_misc      HLO, bad inputs, checkify, jit boundaries, ...

Every case compares permuted rows, probs, tokens_per_expert, the row map, padding rows, the
overflow flag, combine (with and without probs), both VJPs and value_and_grad with
tests/reference.py; FP8 cases compare the e4m3 rows and the scales bit for bit.
"""

from __future__ import annotations

import os
import sys

import ml_dtypes
import numpy as np
import reference as ref
from jax_cases import DTYPES, _run, eq, split, to_global

E4M3 = np.dtype(ml_dtypes.float8_e4m3fn)


def make_inputs(g, case):
    """Per-rank inputs, the reference dispatch and num_permuted_tokens P of one case."""
    rng = np.random.default_rng(case["seed"])
    n, h, el, k = case["n"], case["h"], case["l"], case.get("k", 2)
    dtype = DTYPES[case["dtype"]]
    e = g * el
    flags = case.get("flags", "")
    xs, rms, ps = [], [], []
    for _ in range(g):
        x = rng.standard_normal((n, h), dtype=np.float32)
        x[rng.random((n, h)) < 0.02] = -0.0  # signed zeros travel as they are
        xs.append(x.astype(dtype))
        rm = np.zeros((n, e), bool)
        experts = el if flags == "rank0only" else e
        for t in range(n):
            if rng.random() >= 0.15:  # else: routed nowhere
                rm[t, rng.permutation(experts)[: min(k, experts)]] = True
        rms.append(rm)
        ps.append(rng.uniform(0.01, 1.0, (n, e)).astype(np.float32))  # also where not routed
    probs = None if flags == "noprobs" else ps
    pad = case.get("pad")
    needed = [d["handle"]["num_real_rows"] for d in ref.hybrid_dispatch(xs, rms, probs, el, pad)]
    p = {
        "exact": max(needed),  # exact for the rank that needs the most rows
        "slack": max(needed) + 13,
        "overflow": max(0, min(needed) - 5),  # every rank that receives > 5 rows overflows
        "zero": 0,
    }[case["size"]]
    fp8 = case.get("fp8", "")
    disp = ref.hybrid_dispatch(xs, rms, probs, el, pad, p, fp8=bool(fp8))
    grads = dict(
        ys=[rng.standard_normal((p, h), dtype=np.float32).astype(dtype) for _ in range(g)],
        y_probs=[rng.standard_normal(p, dtype=np.float32) for _ in range(g)],
        g_hidden=[rng.standard_normal((p, h), dtype=np.float32).astype(dtype) for _ in range(g)],
        g_probs=[rng.standard_normal(p, dtype=np.float32) for _ in range(g)],
        g_outs=[rng.standard_normal((n, h), dtype=np.float32).astype(dtype) for _ in range(g)],
        g_cprobs=[rng.standard_normal((n, e), dtype=np.float32) for _ in range(g)],
    )
    fp8_x = [ref.fp8_quantize(x) for x in xs] if fp8 == "e4m3" else None
    return dict(xs=xs, rms=rms, probs=probs, p=p, disp=disp, fp8_x=fp8_x, **grads)


def _cat(arrays):
    return np.concatenate(arrays) if arrays[0].ndim else np.stack(arrays)


def run_hybrid_case(mesh, case):
    """Forward, combine (+ probs), both VJPs and value_and_grad of one case vs the reference."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import PartitionSpec as P

    import jax_fused_a2a as fa

    g = mesh.devices.size
    inp = make_inputs(g, case)
    el, pad, p = case["l"], case.get("pad"), inp["p"]
    fp8 = case.get("fp8", "")
    has_probs = inp["probs"] is not None
    kw = dict(num_local_experts=el, num_permuted_tokens=p, pad_multiple=pad, axis_name="ep")
    if fp8 == "quant":
        kw["fp8"] = True

    def dispatch(x, rm, pr, sf):
        return fa.hybrid_dispatch(x, rm, pr if has_probs else None, scaling_factor=sf, **kw)

    def body(x, sf, rm, pr, ys, yp, gh, gp, go, gcp):
        sf = sf if fp8 == "e4m3" else None
        d = dispatch(x, rm, pr, sf)
        outs = dict(
            hidden=d.hidden,
            tpe=d.tokens_per_expert,
            overflow=d.overflow[None],
            row_token=d.handle.row_token,
            needed=d.handle.num_needed_tokens[None],
        )
        if has_probs:
            outs["probs"] = d.probs
        if fp8:
            outs["scales"] = d.scaling_factor
        if fp8 == "e4m3":  # moved as they are: forward only
            return outs
        if fp8 == "quant":  # straight-through backward: d hidden combined in x's dtype
            # gh arrives as e4m3 (converted on the host): XLA on GPU drops a bf16 -> e4m3 -> bf16
            # round trip made inside the program (excess precision), see docs/JAX.md.
            _, vjp_d = jax.vjp(lambda x_: dispatch(x_, rm, pr, None).hidden, x)
            (outs["dx"],) = vjp_d(gh)
            return outs
        outs["out"] = fa.hybrid_combine(ys, d.handle, axis_name="ep")
        outs["out_p"], outs["cprobs"] = fa.hybrid_combine(ys, d.handle, axis_name="ep", probs=yp)
        _, vjp_c = jax.vjp(lambda y_: fa.hybrid_combine(y_, d.handle, axis_name="ep"), ys)
        (outs["dy"],) = vjp_c(go)
        _, vjp_cp = jax.vjp(
            lambda y_, p_: fa.hybrid_combine(y_, d.handle, axis_name="ep", probs=p_), ys, yp
        )
        outs["dy_p"], outs["dyp"] = vjp_cp((go, gcp))
        if has_probs:
            _, vjp_d = jax.vjp(lambda x_, p_: dispatch(x_, rm, p_, None)[:2], x, pr)
            outs["dx"], outs["dprobs"] = vjp_d((gh, gp))
        else:
            _, vjp_d = jax.vjp(lambda x_: dispatch(x_, rm, None, None).hidden, x)
            (outs["dx"],) = vjp_d(gh)

        def loss(x_, p_):  # linear in x and probs: the gradient is exact, see below
            dd = dispatch(x_, rm, p_, None)
            o = fa.hybrid_combine(dd.hidden, dd.handle, axis_name="ep")
            total = jnp.sum(o.astype(jnp.float32) * go.astype(jnp.float32))
            return total + (jnp.sum(dd.probs * gp) if has_probs else 0.0)

        _, (outs["gx"], outs["gprobs"]) = jax.value_and_grad(loss, argnums=(0, 1))(x, pr)
        return outs

    # FA2A_JAX_KEEP (comma-separated output names; diagnosis only, the tests never set it): the
    # program returns only those outputs and is compiled and run without checks, to bisect which
    # part of a program crashes XLA (tools/diag_jax_p0.py --bisect).
    keep = [k for k in os.environ.get("FA2A_JAX_KEEP", "").split(",") if k]
    if keep:
        full_body = body

        def body(*a):
            return {k: v for k, v in full_body(*a).items() if k in keep}

    spec = P("ep")
    sf = (
        [s for _, s in inp["fp8_x"]]
        if fp8 == "e4m3"
        else [np.zeros((case["n"], 1), np.float32)] * g
    )
    xs = [q for q, _ in inp["fp8_x"]] if fp8 == "e4m3" else inp["xs"]
    probs = inp["probs"] if has_probs else [np.zeros_like(m, np.float32) for m in inp["rms"]]
    names = ("ys", "y_probs", "g_hidden", "g_probs", "g_outs", "g_cprobs")
    grads = dict(inp)
    if fp8 == "quant":
        grads["g_hidden"] = [a.astype(E4M3) for a in inp["g_hidden"]]
    args = [xs, sf, inp["rms"], probs] + [grads[k] for k in names]
    f = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=(spec,) * len(args), out_specs=spec))
    outs = f(*(to_global(mesh, _cat(a)) for a in args))
    if keep:
        jax.block_until_ready(outs)
        return
    got = {k: split(v, g) for k, v in outs.items()}
    check_hybrid_results(got, inp, case, g)


def check_hybrid_results(got, inp, case, g):
    disp = inp["disp"]
    fp8 = case.get("fp8", "")
    for r, d in enumerate(disp):
        if got["hidden"][r] is None:  # held by another process
            continue
        eq(got["hidden"][r], d["hidden"], f"hidden[{r}]")
        if "probs" in got:
            eq(got["probs"][r], d["probs"], f"dispatched probs[{r}]")
        if fp8:
            eq(got["scales"][r], d["scaling_factor"], f"scaling_factor[{r}]")
        eq(got["tpe"][r], d["tokens_per_expert"].astype(np.int32), f"tokens_per_expert[{r}]")
        eq(got["row_token"][r], d["handle"]["row_token"].astype(np.int32), f"row map[{r}]")
        assert bool(got["overflow"][r][0]) == d["overflow"], f"overflow flag[{r}]"
        assert int(got["needed"][r][0]) == d["handle"]["num_real_rows"], f"needed rows[{r}]"
        pad_rows = d["handle"]["row_token"] < 0
        assert not got["hidden"][r][pad_rows].astype(np.float32).any(), f"padding rows[{r}]"
        if case.get("pad") and not d["overflow"]:
            assert (got["tpe"][r] % case["pad"] == 0).all(), f"GEMM padding check[{r}]"
    if case["size"] == "overflow":
        assert any(d["overflow"] for d in disp), "the overflow case overflowed nowhere"
    elif case["size"] in ("exact", "slack"):
        assert not any(d["overflow"] for d in disp)
    if fp8 == "quant":
        dxs, _ = ref.hybrid_dispatch_backward(
            [gh.astype(E4M3).astype(inp["xs"][0].dtype) for gh in inp["g_hidden"]], None, disp
        )
        for r in range(g):
            eq(got["dx"][r], dxs[r], f"fp8 straight-through dx[{r}]")
    if fp8:
        return
    outs, _ = ref.hybrid_combine(inp["ys"], disp)
    outs_p, cprobs = ref.hybrid_combine(inp["ys"], disp, probs=inp["y_probs"])
    dys = ref.hybrid_combine_backward(inp["g_outs"], disp)
    dyps = ref.hybrid_combine_probs_backward(inp["g_cprobs"], disp)
    has_probs = inp["probs"] is not None
    dxs, dps = ref.hybrid_dispatch_backward(
        inp["g_hidden"], inp["g_probs"] if has_probs else None, disp
    )
    # value_and_grad: d hidden = cached dispatch of g_outs, d probs (dispatched) = g_probs
    gxs, gps = ref.hybrid_dispatch_backward(dys, inp["g_probs"] if has_probs else None, disp)
    for r in range(g):
        eq(got["out"][r], outs[r], f"combine out[{r}]")
        eq(got["out_p"][r], outs_p[r], f"combine (with probs) out[{r}]")
        eq(got["cprobs"][r], cprobs[r], f"combined probs[{r}]")
        eq(got["dy"][r], dys[r], f"combine vjp dy[{r}]")
        eq(got["dy_p"][r], dys[r], f"combine (with probs) vjp dy[{r}]")
        eq(got["dyp"][r], dyps[r], f"combine vjp d probs[{r}]")
        eq(got["dx"][r], dxs[r], f"dispatch vjp dx[{r}]")
        eq(got["gx"][r], gxs[r], f"value_and_grad dx[{r}]")
        if has_probs:
            eq(got["dprobs"][r], dps[r], f"dispatch vjp dprobs[{r}]")
            eq(got["gprobs"][r], gps[r], f"value_and_grad dprobs[{r}]")
        elif got["gprobs"][r] is not None:
            assert not got["gprobs"][r].any(), "probs=None: the probs input gets no gradient"


def _case(n, h, el, dtype, pad, size, seed, **extra):
    return dict(n=n, h=h, l=el, dtype=dtype, pad=pad, size=size, seed=seed, **extra)


def hybrid_cases(g):
    """{name: case} on G devices: pad_multiple in {None, 16, 64}, P exact / slack / overflow,
    bf16 / f16 / f32, FP8 (quantised and passed through), probs None, all tokens to rank 0."""
    s = 1000 * g
    cases = {
        "bf16-l2-exact": _case(17, 128, 2, "bf16", None, "exact", s + 1),
        "f32-l1-pad16-exact": _case(20, 64, 1, "f32", 16, "exact", s + 2, k=1),
        "f16-l3-pad64-slack": _case(12, 128, 3, "f16", 64, "slack", s + 3, k=3),
        "bf16-l2-pad16-slack": _case(9, 128, 2, "bf16", 16, "slack", s + 4),
        "bf16-l2-pad16-overflow": _case(30, 128, 2, "bf16", 16, "overflow", s + 5),
        "f32-l4-overflow": _case(25, 64, 4, "f32", None, "overflow", s + 6, k=4),
        "bf16-l2-pad64-overflow": _case(11, 128, 2, "bf16", 64, "overflow", s + 7),
        "bf16-l2-noprobs": _case(11, 128, 2, "bf16", 0, "exact", s + 8, flags="noprobs"),
        "bf16-l4-rank0only": _case(10, 128, 4, "bf16", 16, "exact", s + 9, flags="rank0only"),
        "fp8-quant-l2-pad16": _case(14, 256, 2, "bf16", 16, "exact", s + 10, fp8="quant"),
        "fp8-quant-f32-slack": _case(9, 128, 3, "f32", None, "slack", s + 11, fp8="quant"),
        "fp8-quant-overflow": _case(21, 128, 2, "bf16", 16, "overflow", s + 12, fp8="quant"),
        "fp8-e4m3-l2-pad64": _case(14, 256, 2, "bf16", 64, "slack", s + 13, fp8="e4m3"),
        "bf16-l2-many-rounds": _case(300, 128, 2, "bf16", 16, "slack", s + 14),
        "f32-l2-size-zero": _case(6, 64, 2, "f32", 16, "zero", s + 15),
    }
    if g >= 4:
        cases["bf16-l8-all-local"] = _case(6, 128, 8, "bf16", 16, "exact", s + 16, k=8)
    if g >= 8:  # keep the 8-device run short: a few representative cases
        keep = ("bf16-l2-exact", "bf16-l2-pad16-overflow", "f16-l3-pad64-slack")
        cases = {k: v for k, v in cases.items() if k in keep or k.startswith("fp8-quant-l2")}
    return {f"G{g}-{k}": v for k, v in cases.items()}


def suite_hybrid(g):
    import jax
    from jax.sharding import Mesh

    g = int(g)
    mesh = Mesh(np.array(jax.devices()[:g]), ("ep",))
    results = {}
    # FA2A_JAX_SKIP (comma-separated case names): diagnosis runs only, to see the cases after one
    # that crashed the process; the tests never set it.
    skip = set(filter(None, os.environ.get("FA2A_JAX_SKIP", "").split(",")))
    only = set(filter(None, os.environ.get("FA2A_JAX_ONLY", "").split(",")))  # diagnosis too
    for name, case in hybrid_cases(g).items():
        if name in skip or (only and name not in only):
            continue
        # The case's name first: a crash inside XLA (no Python exception) then says where.
        print(f"case {name}", file=sys.stderr, flush=True)
        results[name] = _run(run_hybrid_case, mesh, case)
    return results


def _misc_suites():
    import jax_cases_hybrid_misc

    return jax_cases_hybrid_misc.SUITES


SUITES = {
    "hybrid": suite_hybrid,
    "hybrid_misc": lambda *a: _misc_suites()["hybrid_misc"](*a),
}
