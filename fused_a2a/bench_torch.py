"""The torch side of ``fused-a2a bench`` / ``check``: one process per rank (gloo on CPU, NCCL on
GPUs). Every rank runs every unit (an implementation at one N) in the same order, checks its own
outputs bit for bit against ``fused_a2a.routing.Expected`` and times each op.

Units: fused_a2a normal mode (torch_fused_a2a.fused_dispatch / fused_combine), fused_a2a HybridEP
(hybrid_ep_dispatch / hybrid_ep_combine), and the peers torch.distributed.all_to_all_single of
the same rows (splits known, no permute: the rows-only lower bound), DeepEP (CUDA, when
``import deep_ep`` works) and "fused_normal_permute": normal mode plus a separate permute /
unpermute in plain torch ops into HybridEP's layout, the baseline HybridEP must not be slower than
(`fused-a2a bench` lists it right after fused_hybrid). Ops: dispatch, combine
(forward) and their backward passes (forward only for fused_normal_permute).
"""

from __future__ import annotations

import os
import statistics
import time
import traceback

import numpy as np

from fused_a2a._common import kernel_sms
from fused_a2a.routing import Expected, fp8_rows, same_bits

UNITS = ("fused_normal", "fused_hybrid", "fused_normal_permute", "a2a", "deep_ep")


def _torch_dtype(name):
    import torch

    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[name]


def to_torch(a: np.ndarray, device):
    """A torch tensor with the same bits as `a` (bf16 through an int16 view)."""
    import torch

    a = np.ascontiguousarray(a)
    if a.dtype.itemsize == 2 and a.dtype.kind == "V":  # ml_dtypes.bfloat16
        return torch.from_numpy(a.view(np.int16).copy()).view(torch.bfloat16).to(device)
    return torch.from_numpy(a.copy()).to(device)


def to_numpy(t, like: np.dtype | None = None) -> np.ndarray:
    import torch

    t = t.detach().cpu().contiguous()
    if t.dtype == torch.bfloat16:
        from fused_a2a.routing import DTYPES

        return t.view(torch.int16).numpy().view(DTYPES["bf16"])
    return t.numpy()


class Timer:
    """(device_us, host_us) per call, medians: the device time with CUDA events around every call
    on GPU (after a synchronize and a barrier), perf_counter on CPU; the host time of the call
    itself (enqueueing, and any host sync inside it; on CPU the same as the device time)."""

    def __init__(self, device, iters: int, warmup: int):
        self.device, self.iters, self.warmup = device, iters, warmup

    def __call__(self, fn) -> tuple[float, float]:
        import torch
        import torch.distributed as dist

        if self.iters <= 0:  # check: correctness only
            return 0.0, 0.0
        for _ in range(self.warmup):
            fn()
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            dist.barrier()
            events = [
                (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                for _ in range(self.iters)
            ]
            host = []
            for start, stop in events:
                start.record()
                t0 = time.perf_counter()
                fn()
                host.append((time.perf_counter() - t0) * 1e6)
                stop.record()
            torch.cuda.synchronize()
            device = statistics.median(s.elapsed_time(e) * 1e3 for s, e in events)
            return device, statistics.median(host)
        dist.barrier()
        times = []
        for _ in range(self.iters):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e6)
        median = statistics.median(times)
        return median, median


class Ctx:
    def __init__(self, rank, world, spec, device):
        import torch.distributed as dist

        self.rank, self.world, self.spec, self.device = rank, world, spec, device
        self.group = dist.group.WORLD
        self.timer = Timer(device, spec["iters"], spec["warmup"])
        self.dtype = _torch_dtype(spec["dtype"])


def _eq(t, want) -> bool:
    return same_bits(to_numpy(t), np.asarray(want))


def _fused_normal(ctx: Ctx, exp: Expected) -> dict:
    import torch

    import torch_fused_a2a as tfa

    r, e, grp = ctx.rank, exp.e, ctx.group
    x_np, idx_np, w_np = exp.inputs[r]
    x, idx, w = (to_torch(a, ctx.device) for a in (x_np, idx_np, w_np))
    want_x, want_idx, want_w, want_tpe = exp.dispatch(r)
    want_out = exp.identity_combine(r)

    recv_x, recv_idx, recv_w, tpe, handle = tfa.fused_dispatch(x, idx, w, e, grp)
    ok_d = (
        _eq(recv_x, want_x)
        and np.array_equal(to_numpy(recv_idx), want_idx)
        and _eq(recv_w, want_w)
        and np.array_equal(tpe.numpy(), want_tpe)
    )
    out, _ = tfa.fused_combine(recv_x, grp, handle)
    ok_c = _eq(out, want_out)
    # Backward: d(dispatch) fed the received rows and weights gives the identity combine and the
    # (owned) weights; d(combine) fed x gives the received rows.
    xg, wg = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
    rx, _, rw, _, _ = tfa.fused_dispatch(xg, idx, wg, e, grp)
    grads = (recv_x.detach(), recv_w.detach())

    def dispatch_bwd():
        return torch.autograd.grad((rx, rw), (xg, wg), grads, retain_graph=True)

    gx, gw = dispatch_bwd()
    ok_db = _eq(gx, want_out) and _eq(gw, exp.weights_grad(r))
    y = recv_x.detach().clone().requires_grad_(True)
    out2, _ = tfa.fused_combine(y, grp, handle)

    def combine_bwd():
        return torch.autograd.grad(out2, y, x, retain_graph=True)

    ok_cb = _eq(combine_bwd()[0], want_x)
    calls = {
        "dispatch": lambda: tfa.fused_dispatch(x, idx, w, e, grp),
        "combine": lambda: tfa.fused_combine(recv_x, grp, handle),
        "dispatch_bwd": dispatch_bwd,
        "combine_bwd": combine_bwd,
    }
    oks = {"dispatch": ok_d, "combine": ok_c, "dispatch_bwd": ok_db, "combine_bwd": ok_cb}
    before = _arena_counts()
    ops = {name: (ctx.timer(fn), oks[name]) for name, fn in calls.items()}
    ops["sms"] = kernel_sms(tfa._num_sms) if ctx.device.type == "cuda" else None
    _profile(ctx, calls, f"n{x.shape[0]}")
    if x.dtype == torch.bfloat16 and x.shape[1] % 128 == 0:
        ops["dispatch_fp8"] = _normal_fp8(ctx, x.shape, idx, w, e)
    after = _arena_counts()
    if after:  # the timed calls' outputs: in the output arena, or torch's for want of room
        ops["arena"] = {k: after[k] - before.get(k, 0) for k in after}
    return ops


def _arena_counts() -> dict:
    """The normal-mode buffer's output-arena counts (torch_fused_a2a._arena.counts); {} without
    a buffer or an arena."""
    from torch_fused_a2a import _arena
    from torch_fused_a2a import fused_a2a as module

    buf = module._buffer
    return _arena.counts(buf.group_id) if buf is not None and not buf.released else {}


def _profile(ctx: Ctx, calls: dict, tag: str) -> None:
    """FA2A_BENCH_PROFILE=op[,op...] (GPU): 10 more calls of each named op under torch.profiler on
    every rank (they are collective); rank 0 prints the host-side and kernel tables, so a host
    cost (an allocator, a wait, a CUDA API call of the core) shows apart from the kernels, and
    with FA2A_BENCH_PROFILE_DIR every rank writes each op's Chrome trace there
    (profile_<op>_<tag>_r<rank>.json)."""
    names = [n for n in os.environ.get("FA2A_BENCH_PROFILE", "").split(",") if n in calls]
    if not names or ctx.device.type != "cuda":
        return
    import torch

    trace_dir = os.environ.get("FA2A_BENCH_PROFILE_DIR")
    activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]

    def profiled(fn, with_stack: bool):  # 10 calls under the profiler
        with torch.profiler.profile(activities=activities, with_stack=with_stack) as prof:
            for _ in range(10):
                fn()
            torch.cuda.synchronize()
        return prof

    for name in names:
        fn = calls[name]
        fn()
        torch.cuda.synchronize()
        prof = profiled(fn, with_stack=False)
        if ctx.rank == 0:
            table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=32)
            print(f"profile of {name} {tag} (rank 0, 10 calls):\n{table}", flush=True)
        if trace_dir:  # 10 more calls with Python's frames (slower: its own pass)
            prof = profiled(fn, with_stack=True)
            # every rank's: the slowest rank's host path sets a host-bound op's period
            prof.export_chrome_trace(
                os.path.join(trace_dir, f"profile_{name}_{tag}_r{ctx.rank}.json")
            )


def _fp8_rows(ctx: Ctx, shape):
    """(e4m3 rows, the same bytes as bf16 integers, scales, padded scales) of this rank on its
    device (routing.fp8_rows)."""
    import torch

    row_bits, scales, padded = (torch.from_numpy(a) for a in fp8_rows(*shape, 4321 + ctx.rank))
    dev = ctx.device
    return (
        row_bits.view(torch.float8_e4m3fn).to(dev),
        row_bits.to(torch.bfloat16).to(dev),
        scales.to(dev),
        padded.to(dev),
    )


def _normal_fp8(ctx: Ctx, shape, idx, w, e):
    """Normal-mode dispatch of e4m3 rows with their 1x128 f32 scales (the op
    torch.ops.fused_a2a.dispatch: Megatron's fused_dispatch takes one tensor), exact size."""
    import torch

    import torch_fused_a2a as tfa

    x8, carried_x, scales, padded = _fp8_rows(ctx, shape)
    buf = tfa.get_buffer(ctx.group, tfa.get_hidden_bytes(carried_x), ctx.device)
    args = (idx, w, e, buf.group_id, buf.rank, buf.num_ranks, -1, tfa._num_sms)
    ops = torch.ops.fused_a2a
    got_x, got_s = ops.dispatch(x8, scales, *args)[:2]
    carried = ops.dispatch(carried_x, None, *args)[0]
    want_s = ops.dispatch(padded, None, *args)[0][:, : scales.shape[1]]
    ok = torch.equal(got_x.view(torch.uint8).cpu(), carried.cpu().to(torch.uint8)) and torch.equal(
        got_s.cpu(), want_s.cpu()
    )
    return ctx.timer(lambda: ops.dispatch(x8, scales, *args)), ok


def _fused_hybrid(ctx: Ctx, exp: Expected) -> dict:
    import torch

    import torch_fused_a2a as tfa

    r, grp, lpr = ctx.rank, ctx.group, exp.lpr
    x = to_torch(exp.inputs[r][0], ctx.device)
    rm_np, probs_np = exp.routing(r)
    rm, probs = to_torch(rm_np, ctx.device), to_torch(probs_np, ctx.device)
    want_h, want_p, want_tpe = exp.hybrid_dispatch(r)
    want_out = exp.hybrid_identity_combine(r)

    hidden, dprobs, _, tpe, handle = tfa.hybrid_ep_dispatch(x, rm, probs, grp, lpr)
    ok_d = (
        _eq(hidden, want_h) and _eq(dprobs, want_p) and np.array_equal(tpe.cpu().numpy(), want_tpe)
    )
    ok_c = _eq(tfa.hybrid_ep_combine(hidden, handle), want_out)
    xg, pg = x.clone().requires_grad_(True), probs.clone().requires_grad_(True)
    hh, hp, _, _, _ = tfa.hybrid_ep_dispatch(xg, rm, pg, grp, lpr)
    grads = (hidden.detach(), dprobs.detach())

    def dispatch_bwd():
        return torch.autograd.grad((hh, hp), (xg, pg), grads, retain_graph=True)

    gx, gp = dispatch_bwd()
    ok_db = _eq(gx, want_out) and _eq(gp, exp.hybrid_probs_grad(r))
    y = hidden.detach().clone().requires_grad_(True)
    out2 = tfa.hybrid_ep_combine(y, handle)

    def combine_bwd():
        return torch.autograd.grad(out2, y, x, retain_graph=True)

    ok_cb = _eq(combine_bwd()[0], want_h)
    t = ctx.timer
    ops = {
        "dispatch": (t(lambda: tfa.hybrid_ep_dispatch(x, rm, probs, grp, lpr)), ok_d),
        "combine": (t(lambda: tfa.hybrid_ep_combine(hidden, handle)), ok_c),
        "dispatch_bwd": (t(dispatch_bwd), ok_db),
        "combine_bwd": (t(combine_bwd), ok_cb),
        "sms": 24 if ctx.device.type == "cuda" else None,
    }
    if x.dtype == torch.bfloat16 and x.shape[1] % 128 == 0:
        ops["dispatch_fp8"] = _hybrid_fp8(ctx, x.shape, rm, probs, lpr)
    return ops


def _hybrid_fp8(ctx: Ctx, shape, rm, probs, lpr):
    """HybridEP dispatch of e4m3 rows with their 1x128 f32 scales (upstream refuses FP8 dispatch;
    we move e4m3 + scales). Checked as data movement: the e4m3 bytes must land where HybridEP puts
    the same bytes carried exactly as bf16 integers 0..126, and the scales where it puts them as
    f32 rows (padded to 16 bytes)."""
    import torch

    import torch_fused_a2a as tfa

    grp = ctx.group
    x8, carried_x, scales, padded = _fp8_rows(ctx, shape)
    nsc = scales.shape[1]
    h8, _, s8, _, _ = tfa.hybrid_ep_dispatch(x8, rm, probs, grp, lpr, scaling_factor=scales)
    carried = tfa.hybrid_ep_dispatch(carried_x, rm, probs, grp, lpr)[0]
    want_s = tfa.hybrid_ep_dispatch(padded, rm, probs, grp, lpr)[0][:, :nsc]
    ok = torch.equal(h8.view(torch.uint8).cpu(), carried.cpu().to(torch.uint8)) and torch.equal(
        s8.cpu(), want_s.cpu()
    )
    return (
        ctx.timer(lambda: tfa.hybrid_ep_dispatch(x8, rm, probs, grp, lpr, scaling_factor=scales)),
        ok,
    )


class _Permute:
    """Normal mode's received rows -> HybridEP's expert-major layout, and back, as a separate pass
    of plain torch ops (what Megatron's moe_utils.permute / unpermute do around a DeepEP
    dispatch / combine).

    Permute: every (row, k) with recv_topk_idx >= 0, stably sorted by local expert. Normal mode
    receives rows in (source rank, source token) order (SEMANTICS.md 1), so within one expert the
    rows come in ascending global token order: exactly HybridEP's order (SEMANTICS.md 2, no
    padding: the bench uses pad_multiple None). A token picks an expert at most once, so every
    expert holds a row at most once.

    Unpermute: out[row] = sum over the row's local experts in ascending order of y[position] in
    float32 from +0.0, then one cast to y's dtype. It runs as one index_add_ per "slot rank" (the
    row's 1st, 2nd, ... smallest local expert): within one call every destination row is distinct,
    so the sum order is fixed on every device (a single scatter-add would use atomics on CUDA).
    The slot-rank group sizes cost one host synchronisation in the permute (the dispatch already
    synchronises for tokens_per_expert)."""

    def __init__(self, recv_idx, tokens_per_expert, num_local: int):
        import torch

        rows_in, k = recv_idx.shape
        self.rows_in = rows_in
        key = torch.where(recv_idx >= 0, recv_idx, num_local)  # no expert: sorted last
        order = torch.sort(key.reshape(-1), stable=True).indices
        total = int(tokens_per_expert.sum())  # a CPU tensor: no device sync
        self.sel = order[:total]  # (row, k) flat index of each permuted row
        self.src_rows = torch.div(self.sel, k, rounding_mode="floor")
        # slot rank of (row, k): how many of the row's experts are smaller than slot k's
        slot_rank = (key.unsqueeze(1) < key.unsqueeze(2)).sum(-1).reshape(-1)[self.sel]
        by_rank = torch.sort(slot_rank, stable=True).indices
        self.groups = []
        start = 0
        for count in torch.bincount(slot_rank, minlength=k).tolist():  # host sync
            if count:
                pos = by_rank[start : start + count]
                self.groups.append((pos, self.src_rows.index_select(0, pos)))
            start += count

    def permute(self, recv_x, recv_w):
        """(hidden [P,H] expert-major, probs [P] f32)."""
        return recv_x.index_select(0, self.src_rows), recv_w.reshape(-1).index_select(0, self.sel)

    def unpermute(self, y):
        import torch

        acc = torch.zeros((self.rows_in, y.shape[1]), dtype=torch.float32, device=y.device)
        for pos, dst in self.groups:
            acc.index_add_(0, dst, y.index_select(0, pos).float())
        return acc.to(y.dtype)


def _normal_permute_combine(exp: Expected, rank: int) -> np.ndarray:
    """What unpermute + normal-mode combine of the identity (y = the permuted rows) returns on
    `rank`: per receiving rank rho ascending, the token's experts on rho summed in ascending order
    in f32 from +0.0 and rounded to the dtype (the unpermute's output), those partial sums added
    in f32 from +0.0 and rounded once (normal combine). HybridEP rounds only once
    (Expected.hybrid_identity_combine), so the two can differ where a token has several experts
    on one rank: bf16/fp16 when the partial sum m*x is not exact in the dtype (m = 3, 5, 6, 7),
    f32 because the same additions are associated differently."""
    rm, _ = exp.routing(rank)
    xf = exp.inputs[rank][0].astype(np.float32)
    acc = np.zeros(xf.shape, np.float32)
    for rho in range(exp.g):
        part = np.zeros(xf.shape, np.float32)
        for j in range(exp.lpr):
            hit = rm[:, rho * exp.lpr + j]
            part[hit] += xf[hit]
        got = exp.hit[rank][:, rho]
        acc[got] += part[got].astype(exp.dtype).astype(np.float32)
    return acc.astype(exp.dtype)


def _fused_normal_permute(ctx: Ctx, exp: Expected) -> dict:
    """The baseline of HybridEP: "dispatch" = fused_dispatch + a separate permute (_Permute) into
    HybridEP's layout, "combine" = a separate unpermute + fused_combine. Forward only.

    Checks: dispatch, bit for bit, gives HybridEP's outputs (Expected.hybrid_dispatch: rows,
    probs, tokens_per_expert). Combine of the identity is checked bit for bit against what this
    two-step pipeline must return (_normal_permute_combine: two roundings), not against
    Expected.hybrid_identity_combine (one rounding): an unpermute-then-combine pipeline rounds
    each rank's partial sum before the cross-rank sum, so it cannot give the HybridEP value in
    general (bf16, 2 ranks, top-8 of 32: about half the tokens differ in some bits)."""
    import torch_fused_a2a as tfa

    r, e, grp, lpr = ctx.rank, exp.e, ctx.group, exp.lpr
    x_np, idx_np, w_np = exp.inputs[r]
    x, idx, w = (to_torch(a, ctx.device) for a in (x_np, idx_np, w_np))
    want_h, want_p, want_tpe = exp.hybrid_dispatch(r)

    def dispatch():
        recv_x, recv_idx, recv_w, tpe, handle = tfa.fused_dispatch(x, idx, w, e, grp)
        perm = _Permute(recv_idx, tpe, lpr)
        hidden, probs = perm.permute(recv_x, recv_w)
        return hidden, probs, tpe, handle, perm

    hidden, probs, tpe, handle, perm = dispatch()
    ok_d = _eq(hidden, want_h) and _eq(probs, want_p) and np.array_equal(tpe.numpy(), want_tpe)

    def combine():
        return tfa.fused_combine(perm.unpermute(hidden), grp, handle)[0]

    ok_c = _eq(combine(), _normal_permute_combine(exp, r))
    t = ctx.timer
    return {
        "dispatch": (t(dispatch), ok_d),
        "combine": (t(combine), ok_c),
        "sms": kernel_sms(tfa._num_sms) if ctx.device.type == "cuda" else None,
    }


def _a2a(ctx: Ctx, exp: Expected) -> dict:
    """all_to_all_single of the rows each rank must receive (splits known, rows pre-gathered:
    no count exchange, no permute), and the reverse exchange (the combine direction, no sum)."""
    import torch
    import torch.distributed as dist

    r = ctx.rank
    send = to_torch(exp.send_rows(r), ctx.device)
    in_splits = [int(c) for c in exp.counts[r]]
    out_splits = [int(c) for c in exp.counts[:, r]]
    out = torch.empty((sum(out_splits), exp.h), dtype=send.dtype, device=ctx.device)
    back = torch.empty_like(send)

    def fwd():
        dist.all_to_all_single(out, send, out_splits, in_splits, group=ctx.group)

    def rev():
        dist.all_to_all_single(back, out, in_splits, out_splits, group=ctx.group)

    fwd()
    ok_f = _eq(out, exp.dispatch(r)[0])
    rev()
    ok_r = _eq(back, exp.send_rows(r))
    return {"dispatch": (ctx.timer(fwd), ok_f), "combine": (ctx.timer(rev), ok_r), "sms": None}


def _deep_ep(ctx: Ctx, exp: Expected) -> dict:
    """DeepEP intranode normal mode (its own layout precomputed, as its test times it)."""
    import deep_ep

    r, world, e = ctx.rank, ctx.world, exp.e
    buffer_cls = deep_ep.Buffer
    sms = 24
    buffer_cls.set_num_sms(sms)
    hidden_bytes = exp.h * max(exp.dtype.itemsize, 2)
    nvl = max(
        cfg.get_nvl_buffer_size_hint(hidden_bytes, world)
        for cfg in (buffer_cls.get_dispatch_config(world), buffer_cls.get_combine_config(world))
    )
    if getattr(ctx, "deep_ep_buffer", None) is None or ctx.deep_ep_buffer.num_nvl_bytes < nvl:
        ctx.deep_ep_buffer = buffer_cls(ctx.group, nvl, 0)
    buf = ctx.deep_ep_buffer
    x_np, idx_np, w_np = exp.inputs[r]
    x, idx, w = (to_torch(a, ctx.device) for a in (x_np, idx_np, w_np))
    per_rank, per_rdma, per_expert, in_rank, _ = buf.get_dispatch_layout(idx, e)

    def dispatch():
        return buf.dispatch(
            x,
            topk_idx=idx,
            topk_weights=w,
            num_tokens_per_rank=per_rank,
            num_tokens_per_rdma_rank=per_rdma,
            is_token_in_rank=in_rank,
            num_tokens_per_expert=per_expert,
        )

    recv_x, _, _, _, handle, _ = dispatch()
    got, want = to_numpy(recv_x), exp.dispatch(r)[0]
    ok_d = same_bits(got, want) or _same_rows(got, want)
    combined = buf.combine(recv_x, handle)[0]
    ok_c = _eq(combined, exp.identity_combine(r))
    return {
        "dispatch": (ctx.timer(dispatch), ok_d),
        "combine": (ctx.timer(lambda: buf.combine(recv_x, handle)), ok_c),
        "sms": sms,
    }


def _same_rows(got: np.ndarray, want: np.ndarray) -> bool:
    """The same rows in some order (bitwise, as a multiset)."""
    if got.shape != want.shape:
        return False
    g = np.ascontiguousarray(got).view(np.uint8).reshape(got.shape[0], -1)
    w = np.ascontiguousarray(want).view(np.uint8).reshape(want.shape[0], -1)
    return np.array_equal(g[np.lexsort(g.T[::-1])], w[np.lexsort(w.T[::-1])])


_UNIT_FNS = {
    "fused_normal": _fused_normal,
    "fused_hybrid": _fused_hybrid,
    "fused_normal_permute": _fused_normal_permute,
    "a2a": _a2a,
    "deep_ep": _deep_ep,
}
UNIT_INFO = {  # unit: (implementation name, mode, is a peer)
    "fused_normal": ("fused_a2a", "normal", False),
    "fused_hybrid": ("fused_a2a", "hybrid", False),
    # a peer, so HybridEP's rows get a "vs" ratio against it (> 1: HybridEP is faster)
    "fused_normal_permute": ("fused_a2a normal+permute", "hybrid", True),
    "a2a": ("all_to_all_single", "rows", True),
    "deep_ep": ("DeepEP", "normal", True),
}


def _unsupported(err: BaseException) -> bool:
    return isinstance(err, (NotImplementedError, ImportError))


def run_units(rank: int, world: int, spec: dict, progress) -> list[dict]:
    """Every unit of the spec on this rank; ranks agree on failures after each unit."""
    import torch
    import torch.distributed as dist

    device = torch.device("cuda", rank) if spec["device"] == "cuda" else torch.device("cpu")
    ctx = Ctx(rank, world, spec, device)
    results, skipped = [], {}
    for n in spec["tokens"]:
        exp = Expected.build(
            world, n, spec["hidden"], spec["topk"], spec["experts"], spec["seed"], spec["dtype"]
        )
        for unit in spec["units"]:
            label = f"torch {UNIT_INFO[unit][0]} {UNIT_INFO[unit][1]} N={n}"
            if unit in skipped:
                progress(label + " (skipped)")
                continue
            res: dict = {"unit": unit, "tokens": n}
            try:
                res["ops"] = _UNIT_FNS[unit](ctx, exp)
            except BaseException as err:  # noqa: BLE001 - reported, every rank learns of it
                kind = "unsupported" if _unsupported(err) else "error"
                res[kind] = f"{type(err).__name__}: {err}".strip()[:2000]
                if kind == "error":
                    res["traceback"] = traceback.format_exc()[-4000:]
            statuses: list = [None] * world
            dist.all_gather_object(statuses, {k: res.get(k) for k in ("unsupported", "error")})
            failed = [(i, s) for i, s in enumerate(statuses) if s["unsupported"] or s["error"]]
            if failed:
                res.pop("ops", None)
                first_rank, first = failed[0]
                reason = f"rank {first_rank}: {first['error'] or first['unsupported']}"
                if all(s["error"] is None for s in statuses):
                    res["unsupported"] = reason
                else:
                    res["error"] = res.get("error") or reason
                skipped[unit] = reason
            if "ops" in res:
                res["recv_bytes"] = exp.recv_rows(rank) * exp.row_bytes()
                res["remote_bytes"] = (exp.recv_rows(rank) - exp.own_rows(rank)) * exp.row_bytes()
            results.append(res)
            progress(label)
        del exp
    return results


def rank_main(rank: int, world: int, port: int, spec: dict, queue) -> None:
    """Process entry point: puts ("progress", text) (rank 0) and ("result", rank, results) or
    ("fatal", rank, text) on the queue."""
    if spec["device"] != "cuda":
        os.environ.setdefault("OMP_NUM_THREADS", "1")
    try:
        import torch
        import torch.distributed as dist

        if spec["device"] == "cuda":
            torch.cuda.set_device(rank)
        else:
            torch.set_num_threads(1)
        dist.init_process_group(
            "nccl" if spec["device"] == "cuda" else "gloo",
            init_method=f"tcp://127.0.0.1:{port}",
            rank=rank,
            world_size=world,
            **({"device_id": torch.device("cuda", rank)} if spec["device"] == "cuda" else {}),
        )

        def progress(text):
            if rank == 0:
                queue.put(("progress", text))

        results = run_units(rank, world, spec, progress)
        queue.put(("result", rank, results))
        dist.barrier()
        dist.destroy_process_group()
    except BaseException as err:  # noqa: BLE001 - the parent prints it
        queue.put(("fatal", rank, f"{type(err).__name__}: {err}\n{traceback.format_exc()}"))
