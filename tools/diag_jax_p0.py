"""Diagnosis: which part of a HybridEP program with num_permuted_tokens = 0 crashes XLA's GPU
compiler (seen on 2 H100s: tests/jax_cases_hybrid.py case size-zero, SIGSEGV in
backend_compile_and_load). Each variant compiles and runs in its own process, so a crash names
the variant.

    python tools/diag_jax_p0.py [G]        # on a GPU machine; prints one line per variant
    python tools/diag_jax_p0.py --bisect   # the failing test program itself (G = 2), run with
                                           # subsets of its outputs (FA2A_JAX_KEEP)
"""

from __future__ import annotations

import os
import subprocess
import sys

VARIANTS = (
    "counts",
    "hidden",
    "combine",
    "combine_vjp",
    "grad",
    "hidden_out",
    "empty_out",
    # The test program also takes zero-size inputs (y [P, H] with P = 0, its probs and cotangents)
    "zero_input_only",
    "combine_zero_input",
    "combine_probs_zero_input",
)


def run_variant(name: str, g: int) -> None:
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import Mesh
    from jax.sharding import PartitionSpec as P

    import jax_fused_a2a as fa

    n, h, el = 6, 64, 2
    rng = np.random.default_rng(0)
    rm = rng.random((g * n, g * el)) < 0.5
    x = rng.standard_normal((g * n, h)).astype(np.float32)
    pr = rng.random((g * n, g * el)).astype(np.float32)
    mesh = Mesh(np.array(jax.devices()[:g]), ("ep",))
    kw = dict(num_local_experts=el, num_permuted_tokens=0, pad_multiple=16, axis_name="ep")

    ys = np.zeros((0, h), np.float32)  # y [P, H] of every device, P = 0
    yp = np.zeros((0,), np.float32)

    def body(x, rm, pr, ys, yp):
        if name == "zero_input_only":  # no fused_a2a op: XLA alone with zero-size inputs
            return x * 2.0, ys * 2.0
        d = fa.hybrid_dispatch(x, rm, pr, **kw)
        if name == "combine_zero_input":
            return fa.hybrid_combine(ys, d.handle, axis_name="ep")
        if name == "combine_probs_zero_input":
            return fa.hybrid_combine(ys, d.handle, axis_name="ep", probs=yp)[0]
        if name == "counts":
            return d.tokens_per_expert
        if name == "hidden":
            return d.hidden.sum(axis=0)
        if name == "hidden_out":  # the zero-size [0, H] rows themselves leave the shard_map
            return d.hidden
        if name == "empty_out":  # no fused_a2a call: a zero-size output alone
            return jnp.zeros((0, h), x.dtype) + x[:0]
        if name == "combine":
            return fa.hybrid_combine(d.hidden, d.handle, axis_name="ep")
        if name == "combine_vjp":
            _, vjp = jax.vjp(lambda y: fa.hybrid_combine(y, d.handle, axis_name="ep"), d.hidden)
            return vjp(x)[0].sum(axis=0)

        def loss(x_, p_):
            dd = fa.hybrid_dispatch(x_, rm, p_, **kw)
            return jnp.sum(fa.hybrid_combine(dd.hidden, dd.handle, axis_name="ep"))

        return jax.grad(loss)(x, pr)

    spec = P("ep")
    f = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=(spec,) * 5, out_specs=spec))
    out = f(x, rm, pr, ys, yp)
    out = out[0] if isinstance(out, tuple) else out
    jax.block_until_ready(out)
    print(f"variant {name}: ok, output {out.shape}", flush=True)


# Output groups of tests/jax_cases_hybrid.py's program, tried one at a time, then all together.
BISECT = (
    "tpe,overflow,row_token,needed",
    "hidden",
    "probs",
    "out",
    "out_p,cprobs",
    "dy",
    "dy_p,dyp",
    "dx,dprobs",
    "gx,gprobs",
    "hidden,probs,tpe,overflow,row_token,needed,out,out_p,cprobs,dy,dy_p,dyp,dx,dprobs,gx,gprobs",
)


# The whole program again with XLA's GPU command buffers off: a custom call that XLA puts into a
# command buffer is one lead for a crash while compiling (openxla/xla PR 30183 made command
# buffers take every compatible custom call and crashed TransformerEngine's custom-call tests).
XLA_FLAG_RUNS = ("--xla_gpu_enable_command_buffer=",)


def bisect(here: str) -> int:
    tests = os.path.join(os.path.dirname(here), "tests")
    runs = [(keep, "") for keep in BISECT] + [(BISECT[-1], flag) for flag in XLA_FLAG_RUNS]
    for keep, flag in runs:
        env = dict(
            os.environ,
            PYTHONPATH=os.pathsep.join([os.path.dirname(here), tests]),
            FA2A_JAX_ONLY="G2-f32-l2-size-zero",
            FA2A_JAX_KEEP=keep,
        )
        if flag:
            env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " " + flag).strip()
            keep = f"{keep} with XLA_FLAGS {flag}"
        proc = subprocess.run(
            [sys.executable, os.path.join(tests, "jax_cases.py"), "hybrid", "2"],
            env=env,
            capture_output=True,
            text=True,
            timeout=180,
        )
        result = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULTS")] or ["-"]
        print(f"keep {keep}: rc={proc.returncode} {result[0][:160]}", flush=True)
    return 0


def main() -> int:
    here = os.path.dirname(os.path.abspath(__file__))
    if sys.argv[1:2] == ["--bisect"]:
        return bisect(here)
    if len(sys.argv) > 2:
        run_variant(sys.argv[2], int(sys.argv[1]))
        return 0
    g = int(sys.argv[1]) if len(sys.argv) > 1 else 2
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.dirname(here), here]))
    for name in VARIANTS:
        proc = subprocess.run(
            [sys.executable, __file__, str(g), name],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        last = (proc.stdout + proc.stderr).strip().splitlines()[-1:] or [""]
        print(f"{name}: rc={proc.returncode} {last[0][:200]}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
