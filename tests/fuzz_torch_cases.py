"""Cases of tests/test_fuzz_torch.py: shared helpers (values, memory layouts, outcome checks) and
the HybridEP cases (drawing, validity per SEMANTICS.md, the rank side, the check against
tests/reference.py). The normal-mode cases and the drivers are in test_fuzz_torch.py."""

from __future__ import annotations

import traceback

import numpy as np
import reference as R

ALLOWED = ("ValueError", "TypeError", "RuntimeError")
FLOATS = ("bf16", "fp16", "fp32")
NP_DTYPES = {
    "bf16": R.BF16,
    "fp16": np.dtype(np.float16),
    "fp32": np.dtype(np.float32),
    "fp64": np.dtype(np.float64),
    "int32": np.dtype(np.int32),
    "int64": np.dtype(np.int64),
    "int16": np.dtype(np.int16),
    "uint8": np.dtype(np.uint8),
    "bool": np.dtype(np.bool_),
    "e4m3": R.E4M3,
}
LAYOUTS = (
    "contiguous",
    "contiguous",
    "contiguous",
    "transposed",
    "strided_cols",
    "strided_rows",
    "offset",
    "broadcast",
)
MAX_H = 64


VALID_H = {"bf16": [8, 16, 24, 64], "fp16": [8, 32, 64], "fp32": [4, 8, 12, 64]}

# ----------------------------------------------------------------------------- drawing


def _values(rng, shape, dtype_name, special: bool):
    if dtype_name == "bool":
        return rng.random(shape) < 0.5
    dtype = NP_DTYPES[dtype_name]
    if dtype.kind in "iu":
        return rng.integers(0, 5, shape).astype(dtype)
    a = rng.standard_normal(shape).astype(np.float32)
    if special and a.size:
        flat = a.reshape(-1)
        picks = rng.integers(0, flat.size, 3)
        flat[picks] = np.array([np.inf, -0.0, -np.inf], np.float32)[: len(picks)]
    return a.astype(dtype)


def _same_path_on_every_rank(case):
    """Groups of several ranks: only errors the group finds together. A layout check or a
    combine row-count check fails only on ranks whose tensors are big enough to show it (a rank
    with N = 0 passes), and a rank that raises before the collective leaves its peers waiting
    for a timeout; the one-rank fuzz covers those checks."""
    if case["defect"] not in (None, "bad_value"):  # a rank with N = 0 would not show it
        case["ns"] = [max(n, 1) for n in case["ns"]]
    keep = ("contiguous", "offset")
    case["layouts"] = [lay if lay in keep else "contiguous" for lay in case["layouts"]]
    case["y_layout"] = "offset" if case["y_layout"] == "offset" else "contiguous"
    case["y_rows"] = 0


# ----------------------------------------------------------------------------- tensors


def _from_numpy(torch, a):
    from torch_utils import from_numpy

    if a.dtype == R.E4M3:
        return torch.from_numpy(a.view(np.uint8).copy()).view(torch.float8_e4m3fn)
    return from_numpy(a)


def make_tensor(torch, a, layout):
    """A tensor with a's values in the given memory layout."""
    t = _from_numpy(torch, a)
    if t.dim() != 2 or layout == "contiguous" or t.numel() == 0:
        return t
    n, h = t.shape
    if layout == "transposed":
        return t.t().contiguous().t()
    if layout == "strided_cols":
        wide = torch.zeros((n, 2 * h), dtype=t.dtype)
        wide[:, ::2] = t
        return wide[:, ::2]
    if layout == "strided_rows":
        tall = torch.zeros((2 * n, h), dtype=t.dtype)
        tall[::2] = t
        return tall[::2]
    if layout == "offset":  # contiguous, but the data starts 1 element into the storage
        flat = torch.zeros(t.numel() + 1, dtype=t.dtype)
        flat[1:] = t.reshape(-1)
        return flat[1:].view(n, h)
    if layout == "broadcast" and n > 0:  # stride 0 over rows: every row is row 0
        return t[:1].expand(n, h)
    return t


def tensor_values(t):
    """The values a tensor holds (after any layout trick), as numpy."""
    import torch
    from torch_utils import to_numpy

    if t.dtype == torch.float8_e4m3fn:
        return t.contiguous().view(torch.uint8).numpy().view(R.E4M3).copy()
    return to_numpy(t.contiguous())


def _outcome(fn):
    try:
        return ("ok", fn())
    except Exception as exc:  # noqa: BLE001 - classified by the checker
        return ("error", type(exc).__name__, f"{exc}\n{traceback.format_exc()[-1500:]}")


def _errors_ok(outcomes, what):
    for r, o in enumerate(outcomes):
        if o[0] == "error":
            assert o[1] in ALLOWED, (
                f"rank {r}: {what} raised {o[1]} (want one of {ALLOWED}): {o[2]}"
            )


def _judge(outcomes, valid, contiguous, what) -> bool:
    """Checks the error side of the contract; True when the outputs must be compared."""
    _errors_ok(outcomes, what)
    kinds = {o[0] for o in outcomes}
    assert len(kinds) == 1, f"{what}: ranks disagree: {[o[:2] for o in outcomes]}"
    if kinds == {"error"}:
        if valid and contiguous:
            raise AssertionError(f"{what}: valid input rejected: {outcomes[0][2]}")
        if valid and not contiguous:
            assert "contiguous" in outcomes[0][2], f"{what}: {outcomes[0][2]}"
        return False
    assert valid is not False, f"{what}: invalid input accepted"
    return True


# ----------------------------------------------------------------------------- HybridEP


HYBRID_DEFECTS = (
    "x_dtype",
    "h",
    "rmap_dtype",
    "rmap_cols",
    "probs",
    "probs_cols",
    "pad",
    "P",
    "layout",
    "y_dtype",
    "y_layout",
)


def draw_hybrid(data, st, num_ranks: int) -> dict:
    """A HybridEP case: a valid one, or a valid one with one defect (half of the cases)."""
    d = data.draw
    n = d(st.integers(0, 16), "N")
    x_dtype = d(st.sampled_from(FLOATS), "x dtype")
    h = d(st.sampled_from(VALID_H[x_dtype]), "hidden")
    y_dtype = d(st.sampled_from(FLOATS), "y dtype")
    if (h * NP_DTYPES[y_dtype].itemsize) % 16:
        y_dtype = x_dtype
    case = dict(
        g=num_ranks,
        x_dtype=x_dtype,
        h=h,
        lpr=d(st.integers(1, 4), "L"),
        ns=[n] * num_ranks,
        seed=d(st.integers(0, 2**31), "seed"),
        rmap_dtype="bool",
        rmap_cols=0,
        density=d(st.sampled_from([0.0, 0.3, 0.6, 1.0]), "density"),
        probs=d(st.sampled_from(["fp32", "fp32", "none"]), "probs"),
        probs_cols=0,
        pad=d(st.sampled_from([None, 0, 1, 4, 16]), "pad_multiple"),
        num_rows=d(st.one_of(st.none(), st.integers(0, 3 * n * 4 + 2)), "P"),
        layouts=["contiguous"] * 3,
        special=d(st.booleans(), "inf/-0.0 values"),
        y_dtype=y_dtype,
        y_layout="contiguous",
    )
    defect = d(st.sampled_from((None,) * len(HYBRID_DEFECTS) + HYBRID_DEFECTS), "defect")
    case["defect"] = defect
    if defect == "x_dtype":
        case["x_dtype"] = d(st.sampled_from(["fp64", "int32", "e4m3"]), "bad x dtype")
    elif defect == "h":
        case["h"] = d(st.sampled_from([1, 3, 7]), "bad hidden")
    elif defect == "rmap_dtype":
        case["rmap_dtype"] = d(st.sampled_from(["uint8", "int32", "fp32"]), "bad rmap dtype")
    elif defect == "rmap_cols":
        case["rmap_cols"] = d(st.sampled_from([-1, 1]), "routing_map cols offset")
    elif defect == "probs":
        case["probs"] = d(st.sampled_from(["bf16", "fp64"]), "bad probs dtype")
    elif defect == "probs_cols":
        case["probs"], case["probs_cols"] = "fp32", 1
    elif defect == "pad":
        case["pad"] = -d(st.integers(1, 3), "negative pad")
    elif defect == "P":
        case["num_rows"] = -d(st.integers(1, 3), "negative P")
    elif defect == "layout":
        case["layouts"] = [d(st.sampled_from(LAYOUTS), f"layout {i}") for i in range(3)]
    elif defect == "y_dtype":
        case["y_dtype"] = d(st.sampled_from(["fp64", "int32"]), "bad y dtype")
    elif defect == "y_layout":
        case["y_layout"] = d(st.sampled_from(LAYOUTS), "y layout")
    if num_ranks > 1:
        _same_path_on_every_rank(case)
    if num_ranks > 1 and defect is None and d(st.sampled_from([False] * 6 + [True]), "unequal N"):
        case["ns"][1] = n + 1
        case["defect"] = "unequal N"
    return case


def hybrid_arrays(case, rank):
    rng = np.random.default_rng([case["seed"], rank])
    n, h, e = case["ns"][rank], case["h"], case["g"] * case["lpr"]
    x = _values(rng, (n, h), case["x_dtype"], case["special"])
    rmap = rng.random((n, e + case["rmap_cols"])) < case["density"]
    rmap = rmap.astype(NP_DTYPES[case["rmap_dtype"]])
    probs = None
    if case["probs"] != "none":
        probs = rng.random((n, e + case["probs_cols"])).astype(NP_DTYPES[case["probs"]])
    return x, rmap, probs


def hybrid_valid(case, arrays) -> bool:
    if case["x_dtype"] not in FLOATS or (case["h"] * NP_DTYPES[case["x_dtype"]].itemsize) % 16:
        return False
    if case["rmap_dtype"] != "bool" or case["rmap_cols"] or len(set(case["ns"])) > 1:
        return False
    if case["probs"] not in ("fp32", "none") or case["probs_cols"]:
        return False
    return (case["pad"] is None or case["pad"] >= 0) and (
        case["num_rows"] is None or case["num_rows"] >= 0
    )


def case_tensors(torch, arrays, layouts, names):
    """A case's input tensors in their layouts (an absent input stays None), and the record of
    them: each input's values under its name, and whether all are contiguous."""
    tensors = [
        None if a is None else make_tensor(torch, a, lay)
        for a, lay in zip(arrays, layouts, strict=True)
    ]
    out = {n: None if t is None else tensor_values(t) for n, t in zip(names, tensors, strict=True)}
    out["contiguous"] = all(t.is_contiguous() for t in tensors if t is not None)
    return tensors, out


def rank_hybrid(torch, tfa, group, rank, case):
    from torch_utils import to_numpy

    arrays = hybrid_arrays(case, rank)
    (xt, rt, pt), out = case_tensors(torch, arrays, case["layouts"], ("x", "rmap", "probs"))
    res = _outcome(
        lambda: tfa.hybrid_ep_dispatch(
            xt,
            rt,
            pt,
            group,
            case["lpr"],
            num_permuted_tokens=case["num_rows"],
            pad_multiple=case["pad"],
        )
    )
    if res[0] == "error":
        out["dispatch"] = res
        return out
    hidden, dprobs, _, tpe, handle = res[1]
    out["dispatch"] = (
        "ok",
        dict(
            hidden=to_numpy(hidden),
            tpe=to_numpy(tpe),
            probs=None if dprobs is None else to_numpy(dprobs),
            overflow=handle.overflow,
        ),
    )
    rng = np.random.default_rng([case["seed"], rank, 7])
    y = _values(rng, tuple(hidden.shape), case["y_dtype"], case["special"])
    yt = make_tensor(torch, y, case["y_layout"])
    out["y"], out["y_contiguous"] = tensor_values(yt), yt.is_contiguous()
    comb = _outcome(lambda: tfa.hybrid_ep_combine(yt, handle))
    out["combine"] = comb if comb[0] == "error" else ("ok", to_numpy(comb[1]))
    return out


def check_hybrid(case, outs):
    arrays = [(o["x"], o["rmap"], o["probs"]) for o in outs]
    contiguous = all(o["contiguous"] for o in outs)
    if not _judge(
        [o["dispatch"] for o in outs], hybrid_valid(case, arrays), contiguous, "hybrid_ep_dispatch"
    ):
        return
    xs, rmaps, probs = (list(a) for a in zip(*arrays, strict=True))
    hd = R.hybrid_dispatch(
        xs, rmaps, None if probs[0] is None else probs, case["lpr"], case["pad"], case["num_rows"]
    )
    for r, o in enumerate(outs):
        got, exp = o["dispatch"][1], hd[r]
        R.assert_bitwise_equal(got["hidden"], exp["hidden"], f"rank {r} hidden")
        if probs[0] is not None:
            R.assert_bitwise_equal(got["probs"], exp["probs"], f"rank {r} probs")
        R.assert_bitwise_equal(got["tpe"], exp["tokens_per_expert"], f"rank {r} tokens/expert")
        assert got["overflow"] == exp["overflow"], f"rank {r} overflow flag"
    y_valid = (
        case["y_dtype"] in FLOATS and (case["h"] * NP_DTYPES[case["y_dtype"]].itemsize) % 16 == 0
    )
    y_contiguous = all(o["y_contiguous"] for o in outs)
    if not _judge([o["combine"] for o in outs], y_valid, y_contiguous, "hybrid_ep_combine"):
        return
    exp_outs, _ = R.hybrid_combine([o["y"] for o in outs], hd)
    for r, o in enumerate(outs):
        R.assert_bitwise_equal(o["combine"][1], exp_outs[r], f"rank {r} hybrid combine")
