"""Pure-NumPy reference of every op in SEMANTICS.md, simulating all G ranks at once.

Written from the spec only (no project code). Inputs are lists indexed by rank; outputs are lists
indexed by rank. Everything is exact data movement except the sums of combine, which follow the
contract's fixed order:

    acc = zeros(H, float32)                       # a float32 +0.0 accumulator
    for rho in ascending order (then j ascending in HybridEP mode):
        acc += y_rho[row].astype(float32)         # IEEE float32 add, round to nearest even
    out = round_once(acc, y.dtype)    # bf16: ml_dtypes RNE; fp16: numpy astype; f32: as is

so a token routed nowhere (or whose rows were all dropped) gets +0.0, and a single -0.0 input
becomes +0.0 (0.0 + -0.0 = +0.0). Values that are selected rather than summed (received weights,
dispatch-backward topk-weight gradients, HybridEP combined probs) are copied bit for bit.

FP8 (the project's definition; HybridEP fp8 dispatch, and any e4m3 quantisation in tests), per 1x128
block of each row of x (H % 128 == 0), all in float32:
    amax  = max(max(|x_block.astype(f32)|), float32(1e-4))
    scale = amax / float32(448.0)                          (f32 division)
    q     = (x_block.astype(f32) / scale).astype(float8_e4m3fn)   (f32 division; ml_dtypes RNE)
    dequantised = q.astype(f32) * scale
Padding rows and rows past the real count are all-zero, scale included (scale 0, not 1e-4/448).

Conventions chosen here (where SEMANTICS.md is silent):
- tokens_per_expert (normal mode) counts (token, slot) pairs, like DeepEP's layout: a token that
  names the same expert in two slots counts twice. Routers never do that; tests avoid it.
- dispatch's `num_recv` is the TRUE count (before any capacity drop); `num_kept = min(num_recv, C)`
  rows are filled; `num_dropped = num_recv - num_kept`; `src` lists the kept rows only.
- recv_topk_idx keeps the input index dtype (int32 or int64).
- HybridEP tokens_per_expert with a static P is clipped greedily in expert order:
  clipped[j] = clip(P - sum(clipped[:j]), 0, padded[j]), so it counts exactly the rows that fit.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np

BF16 = np.dtype(ml_dtypes.bfloat16)
F16 = np.dtype(np.float16)
F32 = np.dtype(np.float32)
E4M3 = np.dtype(ml_dtypes.float8_e4m3fn)
FLOAT_DTYPES = (F32, F16, BF16)
FP8_BLOCK = 128
FP8_MAX = np.float32(448.0)
FP8_AMAX_FLOOR = np.float32(1e-4)


# ----------------------------------------------------------------------------- helpers


def to_f32(a) -> np.ndarray:
    """Exact widening of f32/f16/bf16/e4m3 values to float32."""
    return np.asarray(a).astype(np.float32)


def round_to(dtype, a=None):
    """Round float32 values once to `dtype` (round to nearest even).

    round_to(dtype) returns the rounding function; round_to(dtype, a) applies it to `a`.
    """
    dtype = np.dtype(dtype)
    if dtype not in FLOAT_DTYPES:
        raise TypeError(f"round_to: unsupported dtype {dtype}")

    def fn(x):
        x = np.asarray(x)
        if x.dtype != F32:
            raise TypeError(f"round_to expects float32 input, got {x.dtype}")
        return x.astype(dtype)

    return fn if a is None else fn(a)


_UINT_OF_SIZE = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}


def _bits(a: np.ndarray) -> np.ndarray:
    a = np.ascontiguousarray(a)
    if a.dtype == np.bool_:
        return a.view(np.uint8)
    return a.view(_UINT_OF_SIZE[a.dtype.itemsize])


def assert_bitwise_equal(a, b, name="array"):
    """Assert same dtype, shape and raw bytes (-0.0 != +0.0; NaNs compare by their bits)."""
    a, b = np.asarray(a), np.asarray(b)
    if a.dtype != b.dtype:
        raise AssertionError(f"{name}: dtype {a.dtype} != expected {b.dtype}")
    if a.shape != b.shape:
        raise AssertionError(f"{name}: shape {a.shape} != expected {b.shape}")
    if a.size == 0:
        return
    ba, bb = _bits(a), _bits(b)
    diff = ba != bb
    if not diff.any():
        return
    where = np.argwhere(diff)
    first = tuple(int(i) for i in where[0])
    width = 2 * a.dtype.itemsize
    msg = (
        f"{name}: {len(where)} of {a.size} elements differ bitwise; first at index {first}: "
        f"got {a[first].item()!r} (0x{int(ba[first]):0{width}x}), "
        f"expected {b[first].item()!r} (0x{int(bb[first]):0{width}x})"
    )
    if len(where) > 1:
        more = ", ".join(str(tuple(int(i) for i in w)) for w in where[1:6])
        msg += f"; next: {more}"
    raise AssertionError(msg)


def _check_float(a, what):
    a = np.asarray(a)
    if a.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{what}: unsupported dtype {a.dtype} (f32, f16, bf16)")
    if a.ndim != 2:
        raise ValueError(f"{what}: expected 2-D, got shape {a.shape}")
    return a


def _check_idx(idx, num_experts, what):
    idx = np.asarray(idx)
    if idx.dtype not in (np.int32, np.int64):
        raise TypeError(f"{what}: expected int32 or int64, got {idx.dtype}")
    if idx.ndim != 2:
        raise ValueError(f"{what}: expected 2-D, got shape {idx.shape}")
    if idx.size and (idx.min() < -1 or idx.max() >= num_experts):
        raise ValueError(
            f"{what}: values must be in [-1, {num_experts}), got {idx.min()}..{idx.max()}"
        )
    return idx


def _local_experts(num_experts, num_ranks):
    if num_experts % num_ranks:
        raise ValueError(f"num_experts={num_experts} is not a multiple of G={num_ranks}")
    return num_experts // num_ranks


# ----------------------------------------------------------------------------- FP8


def fp8_quantize(x):
    """Quantise rows per 1x128 block: -> (q [N,H] float8_e4m3fn, scales [N,H/128] f32)."""
    xf = to_f32(x)
    n, h = xf.shape
    if h % FP8_BLOCK:
        raise ValueError(f"fp8: H={h} is not a multiple of {FP8_BLOCK}")
    blocks = xf.reshape(n, h // FP8_BLOCK, FP8_BLOCK)
    amax = np.maximum(np.abs(blocks).max(axis=-1), FP8_AMAX_FLOOR).astype(np.float32)
    scale = (amax / FP8_MAX).astype(np.float32)
    q = (blocks / scale[..., None]).astype(np.float32).astype(E4M3)
    return q.reshape(n, h), scale


def fp8_dequantize(q, scales):
    """q [N,H] e4m3, scales [N,H/128] f32 -> f32 [N,H] = q * scale per block."""
    qf = to_f32(q)
    n, h = qf.shape
    out = qf.reshape(n, h // FP8_BLOCK, FP8_BLOCK) * np.asarray(scales, np.float32)[..., None]
    return out.astype(np.float32).reshape(n, h)


# ----------------------------------------------------------------------------- normal mode


def layout(topk_idx, num_experts, num_ranks):
    """-> (num_tokens_per_rank [G] i32, num_tokens_per_expert [E] i32, is_token_in_rank [N,G])."""
    idx = _check_idx(topk_idx, num_experts, "topk_idx")
    lpr = _local_experts(num_experts, num_ranks)
    n = idx.shape[0]
    valid = idx >= 0
    per_expert = np.bincount(idx[valid].astype(np.int64), minlength=num_experts).astype(np.int32)
    in_rank = np.zeros((n, num_ranks), dtype=bool)
    rows, cols = np.nonzero(valid)
    in_rank[rows, idx[rows, cols] // lpr] = True
    per_rank = in_rank.sum(axis=0).astype(np.int32)
    return per_rank, per_expert, in_rank


def _x_parts(x):
    """x or (e4m3 data, scales) -> list of arrays carried row by row, and the row count."""
    if isinstance(x, tuple):
        data, scales = (np.asarray(p) for p in x)
        if data.dtype != E4M3 or scales.dtype != F32:
            raise TypeError(
                f"fp8 x must be (e4m3 data, f32 scales), got {data.dtype}, {scales.dtype}"
            )
        if data.shape[1] % FP8_BLOCK or scales.shape != (data.shape[0], data.shape[1] // FP8_BLOCK):
            raise ValueError(f"fp8 x: data {data.shape} and scales {scales.shape} do not match")
        return [data, scales]
    return [_check_float(x, "x")]


def dispatch(xs, topk_idxs, topk_weights, num_experts, capacity=None):
    """Normal-mode dispatch on every rank.

    xs[r]: [N_r,H] (f32/f16/bf16) or a tuple (e4m3 data [N_r,H], scales [N_r,H/128] f32);
    topk_idxs[r]: [N_r,K] int32/int64 (-1 = none); topk_weights: list of [N_r,K] f32, or None.
    capacity: None (exact size) or C (static size; drop the end of the receive order).
    Returns a list per rank of dicts:
      recv_x [C,H] (a tuple (data, scales) for fp8 input), recv_topk_idx [C,K] (input idx dtype,
      local expert or -1), recv_topk_weights [C,K] f32 (or None), tokens_per_expert [L] int64,
      num_recv (true count), num_kept, num_dropped, src (list of kept (src_rank, src_token)),
      src_rank / src_token (int64 arrays [num_kept]), rank, num_ranks, num_experts, capacity.
    """
    g = len(xs)
    if len(topk_idxs) != g or (topk_weights is not None and len(topk_weights) != g):
        raise ValueError("xs, topk_idxs and topk_weights must have one entry per rank")
    lpr = _local_experts(num_experts, g)
    parts = [_x_parts(x) for x in xs]
    idxs = [_check_idx(i, num_experts, f"topk_idxs[{r}]") for r, i in enumerate(topk_idxs)]
    ws = None if topk_weights is None else [np.asarray(w) for w in topk_weights]
    k = idxs[0].shape[1]
    for r in range(g):
        n = parts[r][0].shape[0]
        if idxs[r].shape != (n, k):
            raise ValueError(f"topk_idxs[{r}] shape {idxs[r].shape} != ({n}, {k})")
        if ws is not None and (ws[r].dtype != F32 or ws[r].shape != (n, k)):
            raise ValueError(
                f"topk_weights[{r}] must be f32 {(n, k)}, got {ws[r].dtype} {ws[r].shape}"
            )
        if [p.shape[1:] for p in parts[r]] != [p.shape[1:] for p in parts[0]]:
            raise ValueError(f"xs[{r}] hidden size differs from xs[0]")
        if [p.dtype for p in parts[r]] != [p.dtype for p in parts[0]]:
            raise ValueError(f"xs[{r}] dtype differs from xs[0]")

    results = []
    for r in range(g):
        rows = []  # (src, t) in receive order
        for s in range(g):
            owned = (idxs[s] >= 0) & (idxs[s] // lpr == r)
            rows += [(s, int(t)) for t in np.nonzero(owned.any(axis=1))[0]]
        num_recv = len(rows)
        cap = num_recv if capacity is None else int(capacity)
        kept = rows[:cap]
        recv_parts = [np.zeros((cap,) + p.shape[1:], p.dtype) for p in parts[0]]
        recv_idx = np.full((cap, k), -1, dtype=idxs[0].dtype)
        recv_w = None if ws is None else np.zeros((cap, k), np.float32)
        for i, (s, t) in enumerate(kept):
            for dst, src in zip(recv_parts, parts[s], strict=True):
                dst[i] = src[t]
            mine = (idxs[s][t] >= 0) & (idxs[s][t] // lpr == r)
            recv_idx[i] = np.where(mine, idxs[s][t] - r * lpr, -1)
            if ws is not None:
                recv_w[i] = np.where(mine, ws[s][t], np.float32(0))
        local = recv_idx[recv_idx >= 0].astype(np.int64)
        results.append(
            dict(
                recv_x=tuple(recv_parts) if len(recv_parts) == 2 else recv_parts[0],
                recv_topk_idx=recv_idx,
                recv_topk_weights=recv_w,
                tokens_per_expert=np.bincount(local, minlength=lpr).astype(np.int64),
                num_recv=num_recv,
                num_kept=len(kept),
                num_dropped=num_recv - len(kept),
                src=kept,
                src_rank=np.array([s for s, _ in kept], dtype=np.int64),
                src_token=np.array([t for _, t in kept], dtype=np.int64),
                rank=r,
                num_ranks=g,
                num_experts=num_experts,
                capacity=cap,
            )
        )
    return results


def _sum_back(values, dispatch_results, num_tokens_per_rank, what):
    """acc[s][t] = sum over rho ascending of values[rho][row of (s,t)], f32 from +0.0."""
    g = len(dispatch_results)
    if len(values) != g or len(num_tokens_per_rank) != g:
        raise ValueError(f"{what}: need one entry per rank")
    tail = np.asarray(values[0]).shape[1:]
    acc = [np.zeros((int(n),) + tail, np.float32) for n in num_tokens_per_rank]
    for rho in range(g):
        res, v = dispatch_results[rho], np.asarray(values[rho])
        if v.shape[1:] != tail or v.shape[0] < res["num_kept"]:
            raise ValueError(f"{what}[{rho}]: shape {v.shape}, need >= {res['num_kept']} rows")
        vf = to_f32(v[: res["num_kept"]])
        for s in range(g):
            sel = np.nonzero(res["src_rank"] == s)[0]
            # tokens of one source are distinct on one rank, so this fancy += has no collisions
            acc[s][res["src_token"][sel]] += vf[sel]
    return acc


def combine(ys, dispatch_result_per_rank, num_tokens_per_rank, weights=None):
    """Normal-mode combine on every rank.

    ys[rho]: [C_rho,H] (only the first num_kept rows are read); num_tokens_per_rank: N of each
    rank; weights: None or list of [C_rho,K] f32. Returns (outs, combined_weights): outs[s] [N_s,H]
    in y's dtype, combined_weights[s] [N_s,K] f32 or None.
    """
    dtypes = {np.asarray(y).dtype for y in ys}
    if len(dtypes) != 1 or next(iter(dtypes)) not in FLOAT_DTYPES:
        raise TypeError(f"ys: need one float dtype on all ranks, got {dtypes}")
    dtype = next(iter(dtypes))
    acc = _sum_back(ys, dispatch_result_per_rank, num_tokens_per_rank, "ys")
    outs = [round_to(dtype, a) for a in acc]
    if weights is None:
        return outs, None
    if any(np.asarray(w).dtype != F32 for w in weights):
        raise TypeError("combine weights must be float32")
    return outs, _sum_back(weights, dispatch_result_per_rank, num_tokens_per_rank, "weights")


def _row_lookup(res):
    return {(s, t): i for i, (s, t) in enumerate(res["src"])}


def dispatch_backward(grad_recv_xs, grad_recv_weights, dispatch_results, topk_idxs):
    """Gradient of dispatch -> (dx per rank, dtopk_weights per rank or None).

    dx = combine(grad_recv_xs); dtopk_weights[s][t,k] = grad_recv_weights[owner][row of (s,t), k]
    where owner = topk_idx[t,k] // L (selected, bits kept), +0.0 where topk_idx[t,k] == -1 or
    that row was dropped.
    """
    ns = [np.asarray(i).shape[0] for i in topk_idxs]
    dx, _ = combine(grad_recv_xs, dispatch_results, ns)
    if grad_recv_weights is None:
        return dx, None
    g = len(dispatch_results)
    lpr = dispatch_results[0]["num_experts"] // g
    lookups = [_row_lookup(res) for res in dispatch_results]
    gws = [np.asarray(w) for w in grad_recv_weights]
    if any(w.dtype != F32 for w in gws):
        raise TypeError("grad_recv_weights must be float32")
    dws = []
    for s in range(g):
        idx = np.asarray(topk_idxs[s])
        dw = np.zeros(idx.shape, np.float32)
        for t, k in zip(*np.nonzero(idx >= 0), strict=True):
            owner = int(idx[t, k]) // lpr
            row = lookups[owner].get((s, int(t)))
            if row is not None:
                dw[t, k] = gws[owner][row, k]
        dws.append(dw)
    return dx, dws


def _place(values, dispatch_results, what):
    """Cached dispatch: rows of values[s][t] placed as the forward placed (s,t); zeros after."""
    dtype = np.asarray(values[0]).dtype
    tail = np.asarray(values[0]).shape[1:]
    out = []
    for res in dispatch_results:
        rows = np.zeros((res["capacity"],) + tail, dtype)
        for i, (s, t) in enumerate(res["src"]):
            rows[i] = np.asarray(values[s])[t]
        out.append(rows)
    if any(np.asarray(v).dtype != dtype for v in values):
        raise TypeError(f"{what}: dtypes differ between ranks")
    return out


def combine_backward(grad_outs, dispatch_results):
    """Gradient of combine w.r.t. y: a cached dispatch of grad_outs -> dy per rank [C_rho,H]."""
    for s, go in enumerate(grad_outs):
        _check_float(go, f"grad_outs[{s}]")
    return _place(grad_outs, dispatch_results, "grad_outs")


def combine_weights_backward(grad_combined_weights, dispatch_results):
    """Gradient of combine's weights: d weights_rho[row, k] = grad_combined_weights[s][t, k]."""
    return _place(grad_combined_weights, dispatch_results, "grad_combined_weights")


# ----------------------------------------------------------------------------- HybridEP mode


def hybrid_dispatch(
    xs,
    routing_maps,
    probs,
    num_local_experts,
    pad_multiple=None,
    num_permuted_tokens=None,
    fp8=False,
):
    """HybridEP dispatch_with_permute on every rank (SEMANTICS section 2).

    xs[r] [N,H]; routing_maps[r] [N,E] bool; probs: list of [N,E] f32 or None. Returns a list per
    rank of dicts: hidden [P,H] (x's dtype, or e4m3 with fp8), probs [P] f32 (or None),
    scaling_factor [P,H/128] f32 (fp8) or None, tokens_per_expert [L] int64 (padded, clipped),
    overflow (bool), handle (dict: row_token [P] global token g or -1, row_expert [P] local expert
    or -1, num_real_rows (padded total before clipping), ...).
    """
    g = len(xs)
    lpr = int(num_local_experts)
    e = g * lpr
    xs = [_check_float(x, f"xs[{r}]") for r, x in enumerate(xs)]
    n, h = xs[0].shape
    for r in range(g):
        if xs[r].shape != (n, h) or xs[r].dtype != xs[0].dtype:
            raise ValueError(
                f"xs[{r}]: {xs[r].dtype} {xs[r].shape} != xs[0] {xs[0].dtype} {(n, h)}"
            )
        rm = np.asarray(routing_maps[r])
        if rm.dtype != np.bool_ or rm.shape != (n, e):
            raise ValueError(f"routing_maps[{r}]: need bool {(n, e)}, got {rm.dtype} {rm.shape}")
        if probs is not None:
            p = np.asarray(probs[r])
            if p.dtype != F32 or p.shape != (n, e):
                raise ValueError(f"probs[{r}]: need f32 {(n, e)}, got {p.dtype} {p.shape}")
    pad = int(pad_multiple or 0)
    if pad < 0:
        raise ValueError(f"pad_multiple={pad_multiple} < 0")
    x_all = np.concatenate(xs, axis=0)  # global token g = src_rank * N + t
    rm_all = np.concatenate([np.asarray(m) for m in routing_maps], axis=0)
    p_all = None if probs is None else np.concatenate([np.asarray(p) for p in probs], axis=0)
    if fp8:
        data_all, scale_all = fp8_quantize(x_all)
    else:
        data_all, scale_all = x_all, None

    results = []
    for r in range(g):
        row_token, row_expert, padded = [], [], []
        for j in range(lpr):
            toks = np.nonzero(rm_all[:, r * lpr + j])[0]
            count = len(toks)
            full = -(-count // pad) * pad if pad else count
            row_token += list(toks) + [-1] * (full - count)
            row_expert += [j] * count + [-1] * (full - count)
            padded.append(full)
        total = len(row_token)
        rows = total if num_permuted_tokens is None else int(num_permuted_tokens)
        row_token = np.array((row_token + [-1] * rows)[:rows], dtype=np.int64)
        row_expert = np.array((row_expert + [-1] * rows)[:rows], dtype=np.int64)
        clipped, left = [], rows
        for c in padded:
            clipped.append(min(c, left))
            left -= clipped[-1]
        real = row_token >= 0
        hidden = np.zeros((rows, h), data_all.dtype)
        hidden[real] = data_all[row_token[real]]
        scaling = None
        if fp8:
            scaling = np.zeros((rows, h // FP8_BLOCK), np.float32)
            scaling[real] = scale_all[row_token[real]]
        dprobs = None
        if p_all is not None:
            dprobs = np.zeros(rows, np.float32)
            dprobs[real] = p_all[row_token[real], r * lpr + row_expert[real]]
        handle = dict(
            rank=r,
            num_ranks=g,
            num_local_experts=lpr,
            num_tokens=n,
            num_rows=rows,
            row_token=row_token,
            row_expert=row_expert,
            tokens_per_expert=np.array(clipped, dtype=np.int64),
            padded_tokens_per_expert=np.array(padded, dtype=np.int64),
            num_real_rows=total,
            overflow=total > rows,
            pad_multiple=pad,
        )
        results.append(
            dict(
                hidden=hidden,
                probs=dprobs,
                scaling_factor=scaling,
                tokens_per_expert=handle["tokens_per_expert"].copy(),
                overflow=handle["overflow"],
                handle=handle,
            )
        )
    return results


def _handles(handle_per_rank):
    return [h["handle"] if "handle" in h else h for h in handle_per_rank]


def hybrid_combine(ys, handle_per_rank, probs=None):
    """HybridEP combine_with_unpermute on every rank.

    ys[rho] [P_rho,H]; handle_per_rank: the handles (or the dispatch result dicts); probs: list of
    [P_rho] f32 or None. Returns (outs [N,H] per rank in y's dtype, combined_probs [N,E] f32 per
    rank or None). Sum over rho ascending then local expert j ascending, f32 from +0.0, rounded
    once.
    """
    hs = _handles(handle_per_rank)
    g, n, lpr = len(hs), hs[0]["num_tokens"], hs[0]["num_local_experts"]
    dtypes = {np.asarray(y).dtype for y in ys}
    if len(dtypes) != 1 or next(iter(dtypes)) not in FLOAT_DTYPES:
        raise TypeError(f"ys: need one float dtype on all ranks, got {dtypes}")
    dtype = next(iter(dtypes))
    h = np.asarray(ys[0]).shape[1]
    acc = np.zeros((g * n, h), np.float32)
    cprobs = None if probs is None else np.zeros((g * n, g * lpr), np.float32)
    for rho in range(g):
        y, hd = np.asarray(ys[rho]), hs[rho]
        if y.shape != (hd["num_rows"], h):
            raise ValueError(f"ys[{rho}]: shape {y.shape} != {(hd['num_rows'], h)}")
        yf = to_f32(y)
        for j in range(lpr):
            sel = np.nonzero(hd["row_expert"] == j)[0]
            acc[hd["row_token"][sel]] += yf[sel]  # tokens within one expert are distinct
            if cprobs is not None:
                cprobs[hd["row_token"][sel], rho * lpr + j] = np.asarray(probs[rho])[sel]
    outs = [round_to(dtype, acc[s * n : (s + 1) * n]) for s in range(g)]
    if cprobs is None:
        return outs, None
    return outs, [cprobs[s * n : (s + 1) * n] for s in range(g)]


def hybrid_dispatch_backward(grad_hiddens, grad_probs, handle_per_rank):
    """Gradient of hybrid_dispatch -> (dx per rank, dprobs [N,E] per rank or None)."""
    return hybrid_combine(grad_hiddens, handle_per_rank, probs=grad_probs)


def hybrid_combine_backward(grad_outs, handle_per_rank):
    """Gradient of hybrid_combine w.r.t. y: cached dispatch of grad_outs -> [P,H] per rank."""
    hs = _handles(handle_per_rank)
    go_all = np.concatenate([_check_float(go, "grad_outs") for go in grad_outs], axis=0)
    out = []
    for hd in hs:
        rows = np.zeros((hd["num_rows"], go_all.shape[1]), go_all.dtype)
        real = hd["row_token"] >= 0
        rows[real] = go_all[hd["row_token"][real]]
        out.append(rows)
    return out


def hybrid_combine_probs_backward(grad_combined_probs, handle_per_rank):
    """Gradient of hybrid_combine's probs: d probs_rho[row] = grad_combined_probs[g, rho*L + j]."""
    hs = _handles(handle_per_rank)
    gcp = np.concatenate([np.asarray(p, np.float32) for p in grad_combined_probs], axis=0)
    out = []
    for rho, hd in enumerate(hs):
        d = np.zeros(hd["num_rows"], np.float32)
        real = hd["row_token"] >= 0
        lpr = hd["num_local_experts"]
        d[real] = gcp[hd["row_token"][real], rho * lpr + hd["row_expert"][real]]
        out.append(d)
    return out
