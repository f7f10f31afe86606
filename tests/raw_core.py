"""The core's ops on NumPy arrays, one call per rank, for tests that drive the core directly.

Used by the reliability, stress and determinism tests: several ranks as threads of one process
(`ThreadGroup`: every rank's buffer in this process, peers reached by pointer; the ops release the
GIL, so the ranks really run concurrently), or one rank of a multi-process group whose buffer the
torch frontend created (pass its group_id and rank).

Every function mirrors what torch_fused_a2a/_ops.py and _hybrid_ops.py do with tensors, and
returns plain NumPy arrays. Inputs must be C-contiguous.
"""

from __future__ import annotations

import concurrent.futures
import itertools
import os

import ml_dtypes
import numpy as np

import fused_a2a_core as core
from fused_a2a._common import (
    DTYPE_BF16,
    DTYPE_BOOL,
    DTYPE_E4M3,
    DTYPE_F16,
    DTYPE_F32,
    DTYPE_I32,
    DTYPE_I64,
    PLATFORM_CPU,
)

BF16 = np.dtype(ml_dtypes.bfloat16)
E4M3 = np.dtype(ml_dtypes.float8_e4m3fn)
CODES = {
    np.dtype(np.float32): DTYPE_F32,
    np.dtype(np.float16): DTYPE_F16,
    BF16: DTYPE_BF16,
    E4M3: DTYPE_E4M3,
    np.dtype(np.int32): DTYPE_I32,
    np.dtype(np.int64): DTYPE_I64,
    np.dtype(np.bool_): DTYPE_BOOL,
}
_PLACEHOLDER = np.zeros(16, np.uint8)  # non-null pointer for present but empty inputs
_ids = itertools.count(1)


def ptr(a: np.ndarray | None) -> int:
    if a is None:
        return 0
    assert a.flags.c_contiguous, "raw core calls need C-contiguous arrays"
    return a.ctypes.data if a.size else _PLACEHOLDER.ctypes.data


def out_ptr(a: np.ndarray) -> int:
    return a.ctypes.data if a.size else 0


def code(a: np.ndarray) -> int:
    return CODES[a.dtype]


# ----------------------------------------------------------------------------- normal mode


def _dispatch_args(x, idx, w, num_experts):
    args = core.DispatchArgs()
    args.x, args.x_dtype, args.num_tokens, args.hidden = ptr(x), code(x), *x.shape
    args.topk_idx, args.idx_dtype, args.num_topk = ptr(idx), code(idx), idx.shape[1]
    args.topk_weights, args.num_experts = ptr(w), num_experts
    return args


def dispatch(
    gid, rank, num_ranks, x, idx, w, num_experts, capacity=None, notify_only=False, watch=None
):
    """-> dict(recv_x, recv_topk_idx, recv_topk_weights, tokens_per_expert, handle).
    watch(recv_x), if given, is called before the rows are moved (fault-injection tests)."""
    args = _dispatch_args(x, idx, w, num_experts)
    counts = np.zeros(num_ranks, np.int32)
    per_expert = np.zeros(num_experts // num_ranks, np.int32)
    stats = np.zeros(3, np.int32)  # num_recv, num_dropped, group_max_tokens
    args.recv_src_counts, args.tokens_per_expert = ptr(counts), ptr(per_expert)
    args.num_recv, args.num_dropped = stats.ctypes.data, stats.ctypes.data + 4
    args.group_max_tokens = stats.ctypes.data + 8
    dynamic = capacity is None
    if dynamic:
        core.dispatch_notify(gid, rank, 0, args)
        if notify_only:
            return None
        capacity = int(stats[0])
    k, h = idx.shape[1], x.shape[1]
    recv_x = np.empty((capacity, h), x.dtype)
    recv_idx = np.empty((capacity, k), np.int32)
    recv_w = np.empty((capacity, k), np.float32) if w is not None else None
    src_token = np.empty(capacity + 1, np.int32)
    args.capacity, args.recv_x, args.recv_topk_idx = capacity, out_ptr(recv_x), out_ptr(recv_idx)
    args.recv_topk_weights = out_ptr(recv_w) if w is not None else 0
    args.recv_src_token = src_token.ctypes.data
    if watch is not None:
        watch(recv_x)
    (core.dispatch_data if dynamic else core.dispatch)(gid, rank, 0, args)
    handle = dict(
        idx=idx,
        counts=counts,
        src_token=src_token[:capacity].copy(),
        stats=stats,
        num_experts=num_experts,
        num_tokens=x.shape[0],
    )
    return dict(
        recv_x=recv_x,
        recv_topk_idx=recv_idx,
        recv_topk_weights=recv_w,
        tokens_per_expert=per_expert.astype(np.int64),
        handle=handle,
    )


def cached_dispatch(gid, rank, x, handle):
    """Combine's backward: x [N,H] sent where the handle's dispatch sent its rows."""
    args = _dispatch_args(x, handle["idx"], None, handle["num_experts"])
    capacity = handle["src_token"].shape[0]
    recv_x = np.empty((capacity, x.shape[1]), x.dtype)
    counts = handle["counts"].copy()
    scratch = np.empty(capacity + 1, np.int32)
    group_max = handle["stats"][2:3].copy()
    recount = np.empty(2 + handle["num_experts"] // counts.shape[0], np.int32)
    args.capacity, args.recv_x = capacity, out_ptr(recv_x)
    args.recv_src_counts, args.recv_src_token = counts.ctypes.data, scratch.ctypes.data
    args.group_max_tokens = group_max.ctypes.data
    args.num_recv, args.num_dropped = recount.ctypes.data, recount.ctypes.data + 4
    args.tokens_per_expert = recount.ctypes.data + 8
    core.cached_dispatch(gid, rank, 0, args)
    return recv_x


def combine(gid, rank, y, handle, weights=None, owner_only=False, watch=None):
    """-> (out [N,H] y.dtype, out_weights [N,K] f32 or None); watch(out) as in dispatch."""
    idx = handle["idx"]
    n, k = handle["num_tokens"], idx.shape[1]
    out = np.empty((n, y.shape[1]), y.dtype)
    out_w = np.empty((n, k), np.float32) if weights is not None else None
    args = core.CombineArgs()
    args.y, args.y_dtype, args.num_rows, args.hidden = ptr(y), code(y), *y.shape
    args.weights, args.num_topk, args.weights_owner_only = ptr(weights), k, owner_only
    args.recv_src_counts, args.recv_src_token = ptr(handle["counts"]), ptr(handle["src_token"])
    args.group_max_tokens = handle["stats"].ctypes.data + 8
    args.topk_idx, args.idx_dtype = ptr(idx), code(idx)
    args.num_experts, args.num_tokens = handle["num_experts"], n
    args.out, args.out_weights = out_ptr(out), out_ptr(out_w) if out_w is not None else 0
    if watch is not None:
        watch(out)
    core.combine(gid, rank, 0, args)
    return out, out_w


# ----------------------------------------------------------------------------- HybridEP mode


def _hybrid_args(x, rmap, probs, num_local, pad):
    args = core.HybridDispatchArgs()
    args.x, args.x_dtype, args.num_tokens, args.hidden = ptr(x), code(x), *x.shape
    args.routing_map, args.probs = ptr(rmap), ptr(probs)
    args.num_experts, args.num_local_experts, args.pad_multiple = rmap.shape[1], num_local, pad
    return args


def hybrid_dispatch(
    gid,
    rank,
    num_ranks,
    x,
    rmap,
    probs,
    num_local,
    pad=0,
    num_rows=None,
    notify_only=False,
    watch=None,
):
    """-> dict(hidden, probs, tokens_per_expert, handle); num_rows None: the exact P.
    watch(hidden) as in dispatch."""
    args = _hybrid_args(x, rmap, probs, num_local, pad)
    counts = np.zeros(num_ranks * num_local, np.int32)
    per_expert = np.zeros(num_local, np.int32)
    meta = np.zeros(core.HYBRID_META_SIZE, np.int32)
    args.src_expert_counts, args.tokens_per_expert = counts.ctypes.data, per_expert.ctypes.data
    args.meta = meta.ctypes.data
    dynamic = num_rows is None
    if dynamic:
        num_rows = core.hybrid_dispatch_notify(gid, rank, 0, args)
        # the returned P is meta's total rows (the torch op sizes its outputs with it)
        assert num_rows == int(meta[core.HYBRID_META_TOTAL_ROWS]), (num_rows, meta)
        if notify_only:
            return None
    hidden = np.empty((num_rows, x.shape[1]), x.dtype)
    out_probs = np.empty(num_rows, np.float32) if probs is not None else None
    row_token = np.empty(num_rows + 1, np.int32)
    args.num_rows, args.permuted_x = num_rows, out_ptr(hidden)
    args.permuted_probs = out_ptr(out_probs) if probs is not None else 0
    args.row_token = row_token.ctypes.data
    if watch is not None:
        watch(hidden)
    (core.hybrid_dispatch_data if dynamic else core.hybrid_dispatch)(gid, rank, 0, args)
    handle = dict(
        rmap=rmap,
        counts=counts,
        row_token=row_token[:num_rows].copy(),
        meta=meta,
        num_local=num_local,
        pad=pad,
        num_tokens=x.shape[0],
    )
    return dict(
        hidden=hidden, probs=out_probs, tokens_per_expert=per_expert.astype(np.int64), handle=handle
    )


def hybrid_cached_dispatch(gid, rank, x, handle):
    args = _hybrid_args(x, handle["rmap"], None, handle["num_local"], handle["pad"])
    args.src_expert_counts, args.meta = ptr(handle["counts"]), ptr(handle["meta"])
    out = np.empty((handle["row_token"].shape[0], x.shape[1]), x.dtype)
    args.num_rows, args.permuted_x = out.shape[0], out_ptr(out)
    core.hybrid_dispatch_cached(gid, rank, 0, args)
    return out


def hybrid_combine(gid, rank, y, handle, probs=None):
    """-> (out [N,H] y.dtype, combined_probs [N,E] f32 or None)."""
    n, e = handle["num_tokens"], handle["rmap"].shape[1]
    out = np.empty((n, y.shape[1]), y.dtype)
    out_probs = np.empty((n, e), np.float32) if probs is not None else None
    args = core.HybridCombineArgs()
    args.y, args.y_dtype, args.num_rows, args.hidden = ptr(y), code(y), *y.shape
    args.probs = ptr(probs)
    args.src_expert_counts, args.row_token = ptr(handle["counts"]), ptr(handle["row_token"])
    args.meta = ptr(handle["meta"])
    args.num_local_experts, args.pad_multiple = handle["num_local"], handle["pad"]
    args.num_tokens = n
    args.out, args.out_probs = out_ptr(out), out_ptr(out_probs) if probs is not None else 0
    core.hybrid_combine(gid, rank, 0, args)
    return out, out_probs


# ----------------------------------------------------------------------------- thread groups


def new_group_id() -> int:
    """A group id no other buffer of this process uses (and unlikely in another process)."""
    return (os.getpid() << 24 | next(_ids) << 4 | 0x5) & ((1 << 63) - 1)


class ThreadGroup:
    """`num_ranks` ranks in this process, each with its own buffer of `data_bytes`; `run` calls
    fn(rank) on one thread per rank and returns the results (or the exceptions) by rank."""

    def __init__(self, num_ranks: int, data_bytes: int):
        self.num_ranks, self.data_bytes = num_ranks, data_bytes
        self.gid = new_group_id()
        infos = [
            core.buffer_create(self.gid, r, num_ranks, data_bytes, PLATFORM_CPU, 0)
            for r in range(num_ranks)
        ]
        for r in range(num_ranks):
            core.buffer_connect(self.gid, r, infos)
        for r in range(num_ranks):
            core.buffer_seal(self.gid, r)
        self.pool = concurrent.futures.ThreadPoolExecutor(num_ranks)

    def run(self, fn, raise_errors: bool = True) -> list:
        futures = [self.pool.submit(fn, r) for r in range(self.num_ranks)]
        results = []
        for f in futures:
            try:
                results.append(f.result(timeout=max(60.0, 2 * core.timeout_seconds() + 10)))
            except Exception as exc:  # noqa: BLE001
                if raise_errors:
                    raise
                results.append(exc)
        return results

    def release(self) -> None:
        core.buffer_release(self.gid)
        self.pool.shutdown(wait=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()
