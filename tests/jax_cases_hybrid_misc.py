"""JAX HybridEP scenarios beyond the forward/backward matrix: HLO, trace-time errors for bad
inputs, checkify on overflow, handles across jit boundaries, vmap, (dp, ep) meshes, HybridEP and
normal mode in one program, jax.checkpoint, max_permuted_tokens, N = 0, buffer growth and the
Megatron-style dropless round trip. Run by tests/jax_cases.py (suite hybrid_misc)."""

from __future__ import annotations

import numpy as np
import reference as ref
from jax_cases import DTYPES, _run, eq, make_inputs, split
from jax_cases_hybrid import run_hybrid_case
from jax_cases_misc import _expect, _setup, check_hlo


def _inputs(g, n=8, h=128, el=2, dtype="bf16", seed=0, density=0.4):
    rng = np.random.default_rng(seed)
    xs = [rng.standard_normal((n, h), dtype=np.float32).astype(DTYPES[dtype]) for _ in range(g)]
    rms = [rng.random((n, g * el)) < density for _ in range(g)]
    ps = [rng.uniform(0.1, 1.0, (n, g * el)).astype(np.float32) for _ in range(g)]
    return xs, rms, ps, np.concatenate(xs), np.concatenate(rms), np.concatenate(ps)


def _step(mesh, el, p, pad=None, **kw):
    import jax
    from jax.sharding import PartitionSpec as P

    import jax_fused_a2a as fa

    def body(x, rm, pr):
        d = fa.hybrid_dispatch(
            x, rm, pr, num_local_experts=el, num_permuted_tokens=p, pad_multiple=pad,
            axis_name="ep", **kw,
        )  # fmt: skip
        y = (d.hidden.astype("float32") * d.probs[:, None]).astype(x.dtype)
        return fa.hybrid_combine(y, d.handle, axis_name="ep")

    return jax.jit(jax.shard_map(body, mesh=mesh, in_specs=(P("ep"),) * 3, out_specs=P("ep")))


def _round_trip_ref(xs, rms, ps, el, pad, p):
    disp = ref.hybrid_dispatch(xs, rms, ps, el, pad, p)
    ys = [(d["hidden"].astype(np.float32) * d["probs"][:, None]).astype(xs[0].dtype) for d in disp]
    return ref.hybrid_combine(ys, disp)[0], disp


def case_hlo():
    import jax

    mesh = _setup(4)
    *_, x, rm, pr = _inputs(4)
    f = _step(mesh, 2, 48, 16)
    text = f.lower(x, rm, pr).compile().as_text()
    grad = jax.jit(jax.grad(lambda x, p: f(x, rm, p).astype("float32").sum(), argnums=(0, 1)))
    gtext = grad.lower(x, pr).compile().as_text()
    check_hlo(
        text,
        gtext,
        ("fa2a_hybrid_dispatch", "fa2a_hybrid_combine"),
        ("fa2a_hybrid_dispatch", "fa2a_hybrid_cached_dispatch", "fa2a_hybrid_combine"),
    )


def case_bad_inputs():
    import jax
    import jax.numpy as jnp
    from jax.sharding import PartitionSpec as P

    import jax_fused_a2a as fa

    mesh = _setup(2)
    *_, x, rm, pr = _inputs(2, n=8, h=128, el=2)
    base = dict(num_local_experts=2, num_permuted_tokens=16, axis_name="ep")

    def trace(x, rm, pr, **kw):
        kw = {**base, **kw}
        kw = {k: v for k, v in kw.items() if v is not _DROP}

        def body(a, b, c):
            return fa.hybrid_dispatch(a, b, c, **kw).hidden

        f = jax.shard_map(body, mesh=mesh, in_specs=(P("ep"),) * 3, out_specs=P("ep"))
        return lambda: jax.jit(f).trace(x, rm, pr)

    e4m3 = x.astype(jnp.float8_e4m3fn)
    sf = np.ones((16, 1), np.float32)
    cases = [
        (trace(x, rm.astype(np.float32), pr), TypeError, ["routing_map must be bool", "float32"]),
        (trace(x, rm[:, :3], pr), ValueError, ["routing_map must have shape [N, E] = (8, 4)"]),
        (trace(x, rm, pr.astype(jnp.bfloat16)), TypeError, ["probs must be float32", "bfloat16"]),
        (trace(x, rm, pr[:, :3]), ValueError, ["probs must have shape [N, E]", "(8, 3)"]),
        (trace(x, rm, pr, pad_multiple=-1), ValueError, ["pad_multiple must be >= 0", "-1"]),
        (trace(x, rm, pr, num_permuted_tokens=None), TypeError, ["num_permuted_tokens is req"]),
        (trace(x, rm, pr, num_permuted_tokens=_DROP), TypeError, ["num_permuted_tokens"]),
        (trace(x, rm, pr, num_permuted_tokens=-3), ValueError, ["num_permuted_tokens", "-3"]),
        (trace(x, rm, pr, num_permuted_tokens=4.0), TypeError, ["num_permuted_tokens", "4.0"]),
        (trace(x, rm, pr, num_local_experts=0), ValueError, ["num_local_experts", "0"]),
        (trace(x[:, :64], rm, pr, fp8=True), ValueError, ["fp8=True", "H % 128", "H=64"]),
        (trace(x, rm, pr, fp8=1), TypeError, ["fp8 must be a Python bool"]),
        (trace(x[:, 0], rm, pr), ValueError, ["x must be 2-D"]),
        (trace(x.astype(np.int32), rm, pr), TypeError, ["x must be", "int32"]),
        (trace(e4m3, rm, pr), ValueError, ["float8_e4m3fn needs scaling_factor"]),
        (trace(e4m3, rm, pr, scaling_factor=sf, fp8=True), ValueError, ["already float8"]),
        (trace(e4m3, rm, pr, scaling_factor=sf[:, :0]), ValueError, ["scaling_factor", "(8, 1)"]),
        (trace(x, rm, pr, scaling_factor=sf), ValueError, ["scaling_factor is only for"]),
        (trace(x, rm, pr, axis_name="nope"), ValueError, ["axis_name 'nope'"]),
        (
            lambda: fa.hybrid_dispatch(x, rm, pr, **base),
            ValueError,
            ["axis_name 'ep' is not bound"],
        ),
    ]

    def combine_with(fn):
        def body(a, b, c):
            d = fa.hybrid_dispatch(a, b, c, **base)
            return fn(d)

        f = jax.shard_map(body, mesh=mesh, in_specs=(P("ep"),) * 3, out_specs=P("ep"))
        return lambda: jax.jit(f).trace(x, rm, pr)

    def comb(y, h, **kw):
        return fa.hybrid_combine(y, h, axis_name="ep", **kw)

    cases += [
        (
            combine_with(lambda d: comb(d.hidden[:3], d.handle)),
            ValueError,
            ["y must have the dispatch's P=16 rows", "(3, 128)"],
        ),
        (
            combine_with(lambda d: comb(d.hidden.astype(jnp.int32), d.handle)),
            TypeError,
            ["y must be", "int32"],
        ),
        (
            combine_with(lambda d: comb(d.hidden, tuple(d.handle.meta))),
            TypeError,
            ["handle must be the HybridHandle"],
        ),
        (
            combine_with(lambda d: comb(d.hidden, d.handle, probs=d.probs[:3])),
            ValueError,
            ["probs must have shape [P]", "(16,)"],
        ),
        (
            combine_with(lambda d: comb(d.hidden, d.handle, probs=d.probs.astype(jnp.float16))),
            TypeError,
            ["probs must be float32", "float16"],
        ),
    ]
    failures = []
    for i, (fn, exc, frags) in enumerate(cases):
        try:
            _expect(fn, exc, frags)
        except AssertionError as e:
            failures.append(f"bad-input case {i}: {e}")
    assert not failures, "\n".join(failures)


_DROP = object()


def case_checkify():
    import jax
    from jax.experimental import checkify

    mesh = _setup(2)
    *_, x, rm, pr = _inputs(2, n=12)

    def run(p):
        return jax.jit(checkify.checkify(_step(mesh, 2, p, 16, check=True)))(x, rm, pr)[0]

    run(2 * 2 * 24).throw()  # never overflows: nothing raised
    _expect(
        lambda: run(5).throw(), checkify.JaxRuntimeError, ["dropped rows", "num_permuted_tokens=5"]
    )


def case_handle_across_jit():
    import jax
    from jax.sharding import PartitionSpec as P

    import jax_fused_a2a as fa

    mesh = _setup(4)
    xs, rms, ps, x, rm, pr = _inputs(4, n=8)
    spec = P("ep")

    def first(a, b, c):
        d = fa.hybrid_dispatch(
            a, b, c, num_local_experts=2, num_permuted_tokens=40, pad_multiple=8, axis_name="ep"
        )
        return d.hidden, d.handle

    f1 = jax.jit(jax.shard_map(first, mesh=mesh, in_specs=(spec,) * 3, out_specs=spec))
    f2 = jax.jit(
        jax.shard_map(
            lambda y, h: fa.hybrid_combine(y, h, axis_name="ep"),
            mesh=mesh,
            in_specs=(spec, spec),
            out_specs=spec,
        )
    )
    hidden, handle = f1(x, rm, pr)
    assert isinstance(handle, fa.HybridHandle) and handle.pad_multiple == 8, handle
    out = split(f2(hidden, handle), 4)
    disp = ref.hybrid_dispatch(xs, rms, ps, 2, 8, 40)
    ref_out, _ = ref.hybrid_combine([d["hidden"] for d in disp], disp)
    for r in range(4):
        eq(out[r], ref_out[r], f"out[{r}]")


def case_vmap():
    import jax
    from jax.sharding import PartitionSpec as P

    import jax_fused_a2a as fa

    mesh = _setup(2)
    *_, x, rm, pr = _inputs(2, n=8)

    def body(a, b, c):
        return jax.vmap(
            lambda a_, b_, c_: (
                fa.hybrid_dispatch(
                    a_, b_, c_, num_local_experts=2, num_permuted_tokens=8, axis_name="ep"
                ).hidden
            )
        )(a, b, c)

    f = jax.shard_map(body, mesh=mesh, in_specs=(P("ep"),) * 3, out_specs=P("ep"))
    xs, rms, ps = (a.reshape((4, 4) + a.shape[1:]) for a in (x, rm, pr))
    _expect(lambda: jax.jit(f).trace(xs, rms, ps), NotImplementedError, ["vmap", "hybrid"])


def case_multi_axis():
    """A (dp=2, ep=4) mesh: two EP groups, each checked against its own reference run."""
    import jax
    from jax.sharding import Mesh
    from jax.sharding import PartitionSpec as P

    devs = np.array(jax.devices()[:8]).reshape(2, 4)
    mesh = Mesh(devs, ("dp", "ep"))
    groups = [_inputs(4, n=8, seed=30 + s)[:3] for s in range(2)]
    x, rm, pr = (np.concatenate([np.concatenate(gr[i]) for gr in groups]) for i in range(3))
    import jax_fused_a2a as fa

    def body(a, b, c):
        d = fa.hybrid_dispatch(
            a, b, c, num_local_experts=2, num_permuted_tokens=64, pad_multiple=16, axis_name="ep"
        )
        y = (d.hidden.astype("float32") * d.probs[:, None]).astype(a.dtype)
        return fa.hybrid_combine(y, d.handle, axis_name="ep")

    spec = P(("dp", "ep"))
    f = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=(spec,) * 3, out_specs=spec))
    out = split(f(x, rm, pr), 8)
    for s, (xs, rms, ps) in enumerate(groups):
        ref_out, _ = _round_trip_ref(xs, rms, ps, 2, 16, 64)
        for r in range(4):
            eq(out[s * 4 + r], ref_out[r], f"group {s} out[{r}]")


def case_with_normal_mode():
    """Normal-mode dispatch/combine and HybridEP in one program share the group's buffer."""
    import jax
    from jax.sharding import PartitionSpec as P

    import jax_fused_a2a as fa

    mesh = _setup(4)
    xs, rms, ps, x, rm, pr = _inputs(4, n=8, h=128)
    _, idxs, ws = make_inputs(4, 8, 128, 2, 2, DTYPES["bf16"], "random", 9)

    def body(a, b, c, idx, w):
        d = fa.dispatch(a, idx, w, num_experts=8, axis_name="ep")
        o1 = fa.combine(d.recv_x, d.handle, axis_name="ep")
        h = fa.hybrid_dispatch(
            o1, b, c, num_local_experts=2, num_permuted_tokens=64, axis_name="ep"
        )
        return o1, fa.hybrid_combine(h.hidden, h.handle, axis_name="ep")

    f = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=(P("ep"),) * 5, out_specs=P("ep")))
    o1, o2 = (split(o, 4) for o in f(x, rm, pr, np.concatenate(idxs), np.concatenate(ws)))
    res = ref.dispatch(xs, idxs, ws, 8, capacity=32)
    ref_o1, _ = ref.combine([r["recv_x"] for r in res], res, [8] * 4)
    disp = ref.hybrid_dispatch(ref_o1, rms, ps, 2, None, 64)
    ref_o2, _ = ref.hybrid_combine([d["hidden"] for d in disp], disp)
    for r in range(4):
        eq(o1[r], ref_o1[r], f"normal out[{r}]")
        eq(o2[r], ref_o2[r], f"hybrid out[{r}]")


def case_remat_and_dropless_bound():
    """jax.checkpoint around the layer; max_permuted_tokens never overflows (all experts)."""
    import jax

    import jax_fused_a2a as fa

    mesh = _setup(2)
    xs, rms, ps, x, _, pr = _inputs(2, n=10, seed=4)
    rms = [np.ones_like(m) for m in rms]  # every token to every expert: the worst case
    p = fa.max_permuted_tokens(10, 2, 2, 16)
    assert p == 2 * 32, p
    f = _step(mesh, 2, p, 16)
    g_plain = jax.jit(jax.grad(lambda a: f(a, np.concatenate(rms), pr).astype("f4").sum()))
    g_remat = jax.jit(
        jax.grad(lambda a: jax.checkpoint(f)(a, np.concatenate(rms), pr).astype("f4").sum())
    )
    eq(g_remat(x), g_plain(x), "checkpointed gradient")
    out = split(f(x, np.concatenate(rms), pr), 2)
    ref_out, disp = _round_trip_ref(xs, rms, ps, 2, 16, p)
    assert not any(d["overflow"] for d in disp)
    for r in range(2):
        eq(out[r], ref_out[r], f"out[{r}]")


def case_zero_tokens():
    """N = 0 on every rank: zero rows, empty outputs, no error."""
    import jax
    from jax.sharding import PartitionSpec as P

    import jax_fused_a2a as fa

    mesh = _setup(2)
    x = np.zeros((0, 128), DTYPES["bf16"])
    rm, pr = np.zeros((0, 4), bool), np.zeros((0, 4), np.float32)

    def body(a, b, c, dummy):
        d = fa.hybrid_dispatch(
            a, b, c, num_local_experts=2, num_permuted_tokens=16, pad_multiple=16, axis_name="ep"
        )
        out = fa.hybrid_combine(d.hidden, d.handle, axis_name="ep")
        return d.hidden, d.tokens_per_expert, out, dummy

    # The extra non-empty operand (used) works around a Shardy lowering error of jax 0.10.2 when
    # every operand of a shard_map has zero elements (with or without fused_a2a in the body).
    f = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=(P("ep"),) * 4, out_specs=P("ep")))
    hidden, tpe, out, _ = f(x, rm, pr, np.ones(2, np.float32))
    assert hidden.shape == (32, 128) and not np.asarray(hidden).astype(np.float32).any()
    assert not np.asarray(tpe).any() and out.shape == (0, 128)


def case_growth():
    """A HybridEP program whose round needs a larger slot than the group's buffer (made by a
    normal-mode program with a narrow row) gets a new generation; the old program still works."""
    from jax_cases_misc import _inputs as normal_inputs
    from jax_cases_misc import _step as normal_step

    import jax_fused_a2a as fa

    def generations():
        return {k: v["generation"] for k, v in fa.buffer_info().items()}

    mesh = _setup(2)
    small = normal_inputs(2, n=12, h=8, dtype="f32")
    f_small = normal_step(mesh, 4)
    out1 = np.asarray(f_small(*small[3:]))
    gen0 = generations()
    xs, rms, ps, x, rm, pr = _inputs(2, n=6, h=2048, el=8, dtype="f32", density=0.8)
    out2 = split(_step(mesh, 8, 96)(x, rm, pr), 2)
    gen1 = generations()
    grown = {k: (gen0.get(k), v) for k, v in gen1.items() if gen0.get(k) != v}
    assert len(grown) == 1, grown
    ((old, new),) = grown.values()
    assert new == old + 1, grown
    eq(np.asarray(f_small(*small[3:])), out1, "old program after growth")
    ref_out, _ = _round_trip_ref(xs, rms, ps, 8, None, 96)
    for r in range(2):
        eq(out2[r], ref_out[r], f"out[{r}]")


def case_round_trip():
    """Megatron-style dropless check: permute, multiply by probs, unpermute == x times the sum
    of the token's probs over its routed experts (to rounding), and bitwise the reference."""
    mesh = _setup(4)
    xs, rms, ps, x, rm, pr = _inputs(4, n=12, dtype="f32", seed=11)
    p = 4 * 2 * 48
    out = split(_step(mesh, 2, p, 16)(x, rm, pr), 4)
    ref_out, _ = _round_trip_ref(xs, rms, ps, 2, 16, p)
    for r in range(4):
        eq(out[r], ref_out[r], f"out[{r}]")
        expect = xs[r] * np.where(rms[r], ps[r], 0).sum(1, keepdims=True)
        np.testing.assert_allclose(out[r], expect, rtol=1e-5, atol=1e-5)


def case_g1_matrix():
    """G = 1 (a mesh axis of size 1): a few cases of the main matrix."""
    import jax
    from jax.sharding import Mesh
    from jax_cases_hybrid import hybrid_cases

    mesh = Mesh(np.array(jax.devices()[:1]), ("ep",))
    for name, case in hybrid_cases(1).items():
        if any(k in name for k in ("bf16-l2-pad16-overflow", "f16-l3", "fp8-quant-l2")):
            run_hybrid_case(mesh, case)


SUITE_HYBRID_MISC = dict(
    hlo=case_hlo,
    bad_inputs=case_bad_inputs,
    checkify=case_checkify,
    handle_across_jit=case_handle_across_jit,
    vmap=case_vmap,
    multi_axis=case_multi_axis,
    with_normal_mode=case_with_normal_mode,
    remat_and_dropless_bound=case_remat_and_dropless_bound,
    zero_tokens=case_zero_tokens,
    growth=case_growth,
    round_trip=case_round_trip,
    g1_matrix=case_g1_matrix,
)

SUITES = {"hybrid_misc": lambda *_: {n: _run(fn) for n, fn in SUITE_HYBRID_MISC.items()}}
