"""Bad-input fuzz of the JAX frontend (issue 8): property-based (hypothesis), bounded in count.

Cases are drawn like tests/test_fuzz_torch.py's (a valid case, or a valid case with one defect):
shapes, dtypes, ranks of arrays, static arguments (num_experts, max_recv_tokens,
num_local_experts, num_permuted_tokens, pad_multiple), mismatched handles and combine inputs.
Inside jit(shard_map) over 2 CPU devices, a forbidden input must raise TypeError or ValueError at
trace time; an allowed one must compile, run and match tests/reference.py bit for bit (normal
dispatch + combine, HybridEP dispatch + combine). Routing values stay in range here (a bad value
is a run-time error, tested in test_jax_misc). Runs in a child process (this file as a script);
~20 s on 2 cores. FUSED_A2A_FUZZ_SCALE multiplies the example counts.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import traceback

import numpy as np
import pytest

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
G = 2
SCALE = float(os.environ.get("FUSED_A2A_FUZZ_SCALE", "1"))
FLOATS = ("bf16", "fp16", "fp32")
VALID_H = {"bf16": [8, 16, 64], "fp16": [8, 32], "fp32": [4, 12, 64]}


def _np_dtype(name):
    import ml_dtypes

    return {
        "bf16": np.dtype(ml_dtypes.bfloat16),
        "fp16": np.dtype(np.float16),
        "fp32": np.dtype(np.float32),
        "int32": np.dtype(np.int32),
        "int16": np.dtype(np.int16),
        "bool": np.dtype(np.bool_),
        "uint8": np.dtype(np.uint8),
    }[name]


# ----------------------------------------------------------------------------- normal mode

NORMAL_DEFECTS = (
    "x_dtype",
    "h",
    "x_ndim",
    "E",
    "idx_dtype",
    "idx_cols",
    "w_dtype",
    "w_rows",
    "cap",
    "axis",
    "y_dtype",
    "y_rows",
    "y_ndim",
)


def draw_normal(data, st):
    d = data.draw
    x_dtype = d(st.sampled_from(FLOATS), "x dtype")
    lpr = d(st.integers(1, 3), "L")
    n = d(st.integers(1, 8), "N")
    case = dict(
        mode="normal",
        x_dtype=x_dtype,
        h=d(st.sampled_from(VALID_H[x_dtype]), "H"),
        n=n,
        e=G * lpr,
        k=d(st.integers(1, min(3, G * lpr)), "K"),
        idx_dtype="int32",
        idx_cols=0,
        w_dtype="fp32",
        w_rows=0,
        x_ndim=2,
        axis="ep",
        cap=d(st.one_of(st.none(), st.integers(0, G * n + 2)), "max_recv_tokens"),
        y_dtype=d(st.sampled_from(FLOATS), "y dtype"),
        y_rows=0,
        y_ndim=2,
        seed=d(st.integers(0, 2**31), "seed"),
    )
    if (case["h"] * _np_dtype(case["y_dtype"]).itemsize) % 16:
        case["y_dtype"] = x_dtype
    defect = d(st.sampled_from((None,) * len(NORMAL_DEFECTS) + NORMAL_DEFECTS), "defect")
    case["defect"] = defect
    if defect == "x_dtype":
        case["x_dtype"] = d(st.sampled_from(["int32", "bool"]), "bad x dtype")
    elif defect == "h":
        case["h"] = d(st.sampled_from([1, 3, 7]), "bad H")
    elif defect == "x_ndim":
        case["x_ndim"] = d(st.sampled_from([1, 3]), "x ndim")
    elif defect == "E":
        case["e"] = d(st.sampled_from([G * lpr + 1, 0, -G, 2.0 * G]), "bad E")
    elif defect == "idx_dtype":
        case["idx_dtype"] = d(st.sampled_from(["fp32", "int16", "bool"]), "bad idx dtype")
    elif defect == "idx_cols":
        case["idx_cols"] = 1
    elif defect == "w_dtype":
        case["w_dtype"] = d(st.sampled_from(["bf16", "fp16", "int32"]), "bad w dtype")
    elif defect == "w_rows":
        case["w_rows"] = -1
    elif defect == "cap":
        case["cap"] = d(st.sampled_from([-1, 2.5, "8"]), "bad max_recv_tokens")
    elif defect == "axis":
        case["axis"] = "nope"
    elif defect == "y_dtype":
        case["y_dtype"] = d(st.sampled_from(["int32", "bool"]), "bad y dtype")
    elif defect == "y_rows":
        case["y_rows"] = d(st.sampled_from([-1, 1]), "y rows offset")
        case["cap"] = None  # C = G * N >= 2: one row less is a defect
    elif defect == "y_ndim":
        case["y_ndim"] = 3
    return case


def normal_inputs(case):
    rng = np.random.default_rng(case["seed"])
    n, h, k = case["n"], case["h"], case["k"]
    e = int(case["e"]) if isinstance(case["e"], int) and case["e"] > 0 else G
    xs, idxs, ws = [], [], []
    for _ in range(G):
        x = rng.standard_normal((n, h)).astype(np.float32)
        xs.append(x.astype(_np_dtype(case["x_dtype"])))
        idx = np.argsort(rng.random((n, max(e, k))), axis=1)[:, : k + case["idx_cols"]] % e
        idx[rng.random(idx.shape) < 0.2] = -1
        idxs.append(idx)
        ws.append(rng.random((n + case["w_rows"], k)).astype(np.float32))
    return xs, idxs, ws


def normal_valid(case):
    e = case["e"]
    if case["x_dtype"] not in FLOATS or (case["h"] * _np_dtype(case["x_dtype"]).itemsize) % 16:
        return False
    if not isinstance(e, int) or e <= 0 or e % G or case["x_ndim"] != 2 or case["axis"] != "ep":
        return False
    if case["idx_dtype"] in ("fp32", "bool") or case["idx_cols"] or case["w_dtype"] != "fp32":
        return False
    cap = case["cap"]
    if case["w_rows"] or not (cap is None or (isinstance(cap, int) and cap >= 0)):
        return False
    if case["y_rows"] < 0 or case["y_ndim"] != 2 or case["y_dtype"] not in FLOATS:
        return False
    if case["y_rows"] > 0 or cap == 0 or case["idx_dtype"] != "int32":
        return None  # extra rows of y, zero-row outputs, int16 indices: SEMANTICS.md is silent
    return True


def run_normal(case):
    import jax
    import jax.numpy as jnp
    from jax.sharding import Mesh
    from jax.sharding import PartitionSpec as P

    import jax_fused_a2a as fa

    mesh = Mesh(np.array(jax.devices()[:G]), ("ep",))
    xs, idxs, ws = normal_inputs(case)
    x = np.concatenate(xs)
    if case["x_ndim"] == 1:
        x = x.reshape(-1)
    elif case["x_ndim"] == 3:
        x = x[:, None, :]
    idx = np.concatenate(idxs).astype(_np_dtype(case["idx_dtype"]))
    w = np.concatenate(ws).astype(
        _np_dtype(case["w_dtype"])
        if case["w_dtype"] in FLOATS or case["w_dtype"] == "int32"
        else np.float32
    )
    y_dtype = _np_dtype(case["y_dtype"])

    def body(x, idx, w):
        d = fa.dispatch(
            x, idx, w, num_experts=case["e"], axis_name=case["axis"], max_recv_tokens=case["cap"]
        )
        y = d.recv_x.astype(y_dtype)
        if case["y_rows"] < 0:
            y = y[:-1]
        elif case["y_rows"] > 0:
            y = jnp.concatenate([y, y[:1]])
        if case["y_ndim"] == 3:
            y = y[:, None, :]
        out = fa.combine(y, d.handle, axis_name="ep")
        return d.recv_x, d.num_recv_tokens[None], out

    f = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=(P("ep"),) * 3, out_specs=P("ep")))
    recv, num_recv, out = f(x, idx, w)
    return np.asarray(recv), np.asarray(num_recv), np.asarray(out)


def check_normal(case, result):
    import reference as R

    xs, idxs, ws = normal_inputs(case)
    recv, num_recv, out = result
    e, cap = case["e"], case["cap"]
    disp = R.dispatch(xs, [i.astype(np.int32) for i in idxs], ws, e, capacity=cap)
    c = recv.shape[0] // G
    assert c == (G * case["n"] if cap is None else cap), recv.shape
    for r in range(G):
        assert int(num_recv[r]) == disp[r]["num_recv"], (r, num_recv, disp[r]["num_recv"])
        kept = disp[r]["num_kept"]
        R.assert_bitwise_equal(recv[r * c : r * c + kept], disp[r]["recv_x"][:kept], f"recv {r}")
        assert not recv[r * c + kept : (r + 1) * c].astype(np.float32).any(), "rows past the end"
    y_dtype = _np_dtype(case["y_dtype"])
    ys = [recv[r * c : (r + 1) * c][: disp[r]["num_kept"]].astype(y_dtype) for r in range(G)]
    for d in disp:
        d["recv_x"] = d["recv_x"][: d["num_kept"]]
    outs, _ = R.combine(ys, disp, [case["n"]] * G)
    R.assert_bitwise_equal(out, np.concatenate(outs), "combine")


# ----------------------------------------------------------------------------- HybridEP

HYBRID_DEFECTS = (
    "x_dtype",
    "h",
    "L",
    "rmap_dtype",
    "rmap_cols",
    "probs_dtype",
    "P",
    "pad",
    "y_dtype",
    "y_rows",
    "probs_rows",
)


def draw_hybrid(data, st):
    d = data.draw
    x_dtype = d(st.sampled_from(FLOATS), "x dtype")
    n = d(st.integers(1, 8), "N")
    lpr = d(st.integers(1, 3), "L")
    pad = d(st.sampled_from([None, 0, 4]), "pad_multiple")
    case = dict(
        mode="hybrid",
        x_dtype=x_dtype,
        h=d(st.sampled_from(VALID_H[x_dtype]), "H"),
        n=n,
        lpr=lpr,
        L=lpr,
        rmap_dtype="bool",
        rmap_cols=0,
        probs_dtype="fp32",
        probs_rows=0,
        pad=pad,
        P=d(st.integers(0, G * n * lpr + 8), "P"),
        y_dtype=d(st.sampled_from(FLOATS), "y dtype"),
        y_rows=0,
        density=d(st.sampled_from([0.0, 0.4, 1.0]), "density"),
        seed=d(st.integers(0, 2**31), "seed"),
    )
    if (case["h"] * _np_dtype(case["y_dtype"]).itemsize) % 16:
        case["y_dtype"] = x_dtype
    defect = d(st.sampled_from((None,) * len(HYBRID_DEFECTS) + HYBRID_DEFECTS), "defect")
    case["defect"] = defect
    if defect == "x_dtype":
        case["x_dtype"] = d(st.sampled_from(["int32", "bool"]), "bad x dtype")
    elif defect == "h":
        case["h"] = d(st.sampled_from([1, 3]), "bad H")
    elif defect == "L":
        case["L"] = d(st.sampled_from([0, lpr + 1, -1]), "bad num_local_experts")
    elif defect == "rmap_dtype":
        case["rmap_dtype"] = d(st.sampled_from(["int32", "uint8"]), "bad routing_map dtype")
    elif defect == "rmap_cols":
        case["rmap_cols"] = 1
    elif defect == "probs_dtype":
        case["probs_dtype"] = d(st.sampled_from(["bf16", "int32"]), "bad probs dtype")
    elif defect == "P":
        case["P"] = d(st.sampled_from([-1, None, 2.5]), "bad num_permuted_tokens")
    elif defect == "pad":
        case["pad"] = -2
    elif defect == "y_dtype":
        case["y_dtype"] = d(st.sampled_from(["int32", "bool"]), "bad y dtype")
    elif defect == "y_rows":
        case["y_rows"] = d(st.sampled_from([-1, 1]), "y rows offset")
        case["P"] = max(case["P"], 1)  # one row less is a defect
    elif defect == "probs_rows":
        case["probs_rows"] = 1
        case["P"] = max(case["P"], 1)  # probs[:1] of zero rows would add none
    return case


def hybrid_inputs(case):
    rng = np.random.default_rng(case["seed"])
    n, h, e = case["n"], case["h"], G * case["lpr"]
    xs, rmaps, probs = [], [], []
    for _ in range(G):
        x = rng.standard_normal((n, h)).astype(np.float32)
        xs.append(x.astype(_np_dtype(case["x_dtype"])))
        rmaps.append(rng.random((n, e + case["rmap_cols"])) < case["density"])
        probs.append(rng.random((n, e + case["rmap_cols"])).astype(np.float32))
    return xs, rmaps, probs


def hybrid_valid(case):
    if case["x_dtype"] not in FLOATS or (case["h"] * _np_dtype(case["x_dtype"]).itemsize) % 16:
        return False
    if case["L"] != case["lpr"] or case["rmap_dtype"] != "bool" or case["rmap_cols"]:
        return False
    if case["probs_dtype"] != "fp32" or case["y_rows"] or case["probs_rows"]:
        return False
    if case["y_dtype"] not in FLOATS:
        return False
    p, pad = case["P"], case["pad"]
    if not (isinstance(p, int) and p >= 0 and (pad is None or pad >= 0)):
        return False
    return None if p == 0 else True  # zero-row outputs: SEMANTICS.md is silent


def run_hybrid(case):
    import jax
    import jax.numpy as jnp
    from jax.sharding import Mesh
    from jax.sharding import PartitionSpec as P

    import jax_fused_a2a as fa

    mesh = Mesh(np.array(jax.devices()[:G]), ("ep",))
    xs, rmaps, probs = hybrid_inputs(case)
    x = np.concatenate(xs)
    rmap = np.concatenate(rmaps).astype(_np_dtype(case["rmap_dtype"]))
    pr = np.concatenate(probs)
    if case["probs_dtype"] != "fp32":
        pr = pr.astype(_np_dtype(case["probs_dtype"]))
    y_dtype = _np_dtype(case["y_dtype"])

    def body(x, rmap, pr):
        d = fa.hybrid_dispatch(
            x,
            rmap,
            pr,
            num_local_experts=case["L"],
            num_permuted_tokens=case["P"],
            pad_multiple=case["pad"],
            axis_name="ep",
        )
        y = d.hidden.astype(y_dtype)
        if case["y_rows"] < 0:
            y = y[:-1]
        elif case["y_rows"] > 0:
            y = jnp.concatenate([y, y[:1]])
        dprobs = d.probs
        if case["probs_rows"]:
            dprobs = jnp.concatenate([dprobs, dprobs[:1]])
        out, cprobs = fa.hybrid_combine(y, d.handle, axis_name="ep", probs=dprobs)
        return d.hidden, out, cprobs

    f = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=(P("ep"),) * 3, out_specs=P("ep")))
    return tuple(np.asarray(a) for a in f(x, rmap, pr))


def check_hybrid(case, result):
    import reference as R

    xs, rmaps, probs = hybrid_inputs(case)
    hidden, out, cprobs = result
    hd = R.hybrid_dispatch(xs, rmaps, probs, case["lpr"], case["pad"], case["P"])
    p = case["P"]
    for r in range(G):
        R.assert_bitwise_equal(hidden[r * p : (r + 1) * p], hd[r]["hidden"], f"hidden {r}")
    y_dtype = _np_dtype(case["y_dtype"])
    ys = [hidden[r * p : (r + 1) * p].astype(y_dtype) for r in range(G)]
    outs, cps = R.hybrid_combine(ys, hd, [d["probs"] for d in hd])
    R.assert_bitwise_equal(out, np.concatenate(outs), "hybrid combine")
    R.assert_bitwise_equal(cprobs, np.concatenate(cps), "hybrid combined probs")


# ----------------------------------------------------------------------------- driver


def _classify(case, valid, run, check):
    try:
        result = run(case)
    except (TypeError, ValueError) as exc:
        if valid is True:
            raise AssertionError(f"valid input rejected: {type(exc).__name__}: {exc}") from exc
        return "error"
    except NotImplementedError:
        return "error"
    if valid is False:
        raise AssertionError("invalid input accepted")
    check(case, result)
    return "ok"


def main():
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis import strategies as st

    stats, failures = {}, []
    modes = {
        "normal": (draw_normal, normal_valid, run_normal, check_normal, int(60 * SCALE)),
        "hybrid": (draw_hybrid, hybrid_valid, run_hybrid, check_hybrid, int(50 * SCALE)),
    }

    def make_fuzz(mode, draw, valid_fn, run, check, count):
        @settings(
            max_examples=max(1, count),
            deadline=None,
            derandomize=True,
            database=None,
            phases=[Phase.generate],
            suppress_health_check=list(HealthCheck),
        )
        @given(st.data())
        def fuzz(data):
            case = draw(data, st)
            if failures:
                return
            try:
                kind = _classify(case, valid_fn(case), run, check)
                stats[f"{mode} {kind}"] = stats.get(f"{mode} {kind}", 0) + 1
            except Exception as exc:  # noqa: BLE001
                failures.append(f"{exc}\ncase: {case!r}\n{traceback.format_exc()[-3000:]}")

        return fuzz

    for mode, spec in modes.items():
        make_fuzz(mode, *spec)()
    print("RESULTS " + json.dumps(dict(stats=stats, failures=failures)), flush=True)


def test_fuzz_jax():
    from jax_harness import child_env, require_jax

    require_jax()
    proc = subprocess.run(
        [sys.executable, os.path.abspath(__file__)],
        env=child_env(G),
        capture_output=True,
        text=True,
        timeout=600 * max(1.0, SCALE),
        cwd=TESTS_DIR,
    )
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULTS ")]
    if not lines:
        pytest.fail(
            f"fuzz child exited with {proc.returncode}:\n{(proc.stdout + proc.stderr)[-6000:]}"
        )
    res = json.loads(lines[-1][len("RESULTS ") :])
    print(f"\nJAX fuzz: {res['stats']}")
    assert not res["failures"], res["failures"][0]
    for mode in ("normal", "hybrid"):
        assert res["stats"].get(f"{mode} ok", 0) >= 5, res["stats"]
        assert res["stats"].get(f"{mode} error", 0) >= 5, res["stats"]


if __name__ == "__main__":
    sys.path.insert(0, TESTS_DIR)
    main()
