"""Normal-mode (DeepEP-style) dispatch / combine for JAX, with static shapes.

Semantics: docs/JAX.md and SEMANTICS.md sections 1 and 3. Every op is called inside `jax.shard_map`
(or wherever `axis_name` is bound to the EP mesh axis); the rank is `jax.lax.axis_index(axis_name)`.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from . import _ffi
from ._checks import (
    axis_size,
    check_combine,
    check_dispatch,
    check_layout,
    hidden_bytes,
    rank_and_sub,
    unify_vma,
)

_E4M3 = np.dtype(jnp.float8_e4m3fn)


class DispatchHandle(NamedTuple):
    """What combine and a cached dispatch need; a pytree of arrays, none of them 0-d, so that it
    can be a residual, cross `jit` boundaries, and leave a `shard_map` with out_specs P(axis) on
    every leaf. Shapes: N tokens, K top-k, G ranks, C = max_recv_tokens, L local experts."""

    topk_idx: jax.Array  # [N, K] this rank's routing (send side), as given (int32 or int64)
    recv_src_counts: jax.Array  # [G] int32 rows kept from each source rank
    recv_src_token: jax.Array  # [C] int32 source token index of each row, -1 past the end
    group_max_tokens: jax.Array  # [1] int32 max N over the group
    tokens_per_expert: jax.Array  # [L] int32 (kept pairs); its length gives L
    num_kept: jax.Array  # [1] int32 rows kept (min(num_recv_tokens, C))
    num_dropped: jax.Array  # [1] int32 rows that did not fit C


class Dispatched(NamedTuple):
    recv_x: jax.Array  # [C, H] x.dtype; rows >= num_recv_tokens are zeros
    recv_topk_idx: jax.Array  # [C, K] int32 local expert index, -1 where not owned / past the end
    recv_topk_weights: jax.Array  # [C, K] float32, 0 where recv_topk_idx is -1
    tokens_per_expert: jax.Array  # [L] int32 received (token, local expert) pairs
    num_recv_tokens: jax.Array  # [] int32 rows sent to this rank (true count, before dropping)
    handle: DispatchHandle
    num_dropped: jax.Array  # [] int32 rows dropped because num_recv > max_recv_tokens
    recv_x_scales: jax.Array | None = None  # [C, H/128] float32 with FP8 rows (zeros past the end)


@dataclasses.dataclass(frozen=True)
class _Cfg:
    axis_name: str
    num_experts: int
    num_ranks: int
    capacity: int
    fp8_rows: bool = False  # dispatch: x is float8_e4m3fn with x_scales


def _like(ref, shape, dtype):
    return jax.typeof(ref).update(shape=tuple(shape), dtype=np.dtype(dtype), weak_type=False)


# ---------------------------------------------------------------------------------------------
# Raw calls (no autodiff)


def _dispatch_call(cfg: _Cfg, x, x_scales, topk_idx, topk_weights):
    """-> the 9 results of fa2a_dispatch (recv_x, recv_topk_idx, recv_topk_weights, then the
    handle's arrays: _handle_of), then recv_x_scales (None without FP8 rows)."""
    n, h = x.shape
    k = topk_idx.shape[1]
    c, g, el = cfg.capacity, cfg.num_ranks, cfg.num_experts // cfg.num_ranks
    rank, sub = rank_and_sub(cfg.axis_name, like=x)
    i32 = np.int32
    fp8 = x_scales is not None
    scales_out = [_like(x, (c, x_scales.shape[1]), np.float32)] if fp8 else []
    outs = _ffi.call(
        "fa2a_dispatch_fp8" if fp8 else "fa2a_dispatch",
        [rank, sub, x, *([x_scales] if fp8 else []), topk_idx, topk_weights],
        [
            _like(x, (c, h), x.dtype),  # recv_x
            *scales_out,  # recv_x_scales
            _like(x, (c, k), i32),  # recv_topk_idx
            _like(x, (c, k), np.float32),  # recv_topk_weights
            _like(x, (g,), i32),  # recv_src_counts
            _like(x, (c,), i32),  # recv_src_token
            _like(x, (el,), i32),  # tokens_per_expert
            _like(x, (1,), i32),  # num_recv (kept)
            _like(x, (1,), i32),  # num_dropped
            _like(x, (1,), i32),  # group_max_tokens
        ],
        attrs=(("num_experts", cfg.num_experts),),
        group=(cfg.axis_name, hidden_bytes(x), k),
    )
    del n
    if fp8:
        return (outs[0], *outs[2:], outs[1])
    return (*outs, None)


def _cached_dispatch_call(cfg: _Cfg, x, handle: DispatchHandle):
    h = x.shape[1]
    c = handle.recv_src_token.shape[0]
    g = handle.recv_src_counts.shape[0]
    el = handle.tokens_per_expert.shape[0]
    k = handle.topk_idx.shape[1]
    rank, sub = rank_and_sub(cfg.axis_name, like=x)
    i32 = np.int32
    outs = _ffi.call(
        "fa2a_cached_dispatch",
        [rank, sub, x, handle.topk_idx, handle.recv_src_counts, handle.group_max_tokens],
        [
            _like(x, (c, h), x.dtype),  # recv_x
            _like(x, (g,), i32),  # recv_src_counts (aliased to operand 4)
            _like(x, (1,), i32),  # group_max_tokens (aliased to operand 5)
            _like(x, (c,), i32),  # recv_src_token
            _like(x, (el,), i32),  # tokens_per_expert
            _like(x, (1,), i32),  # num_recv
            _like(x, (1,), i32),  # num_dropped
        ],
        attrs=(("num_experts", el * g),),
        aliases=((4, 1), (5, 2)),
        group=(cfg.axis_name, hidden_bytes(x), k),
    )
    return outs[0]


def _combine_call(cfg: _Cfg, y, handle: DispatchHandle, weights=None, owner_only=False):
    n, k = handle.topk_idx.shape
    g = handle.recv_src_counts.shape[0]
    el = handle.tokens_per_expert.shape[0]
    rank, sub = rank_and_sub(cfg.axis_name, like=y)
    hs = (handle.recv_src_counts, handle.recv_src_token, handle.group_max_tokens, handle.topk_idx)
    group = (cfg.axis_name, hidden_bytes(y), k)
    if weights is None:
        (out,) = _ffi.call(
            "fa2a_combine",
            [rank, sub, y, *hs],
            [_like(y, (n, y.shape[1]), y.dtype)],
            attrs=(("num_experts", el * g),),
            group=group,
        )
        return out
    out, out_w = _ffi.call(
        "fa2a_combine_weighted",
        [rank, sub, y, weights, *hs],
        [_like(y, (n, y.shape[1]), y.dtype), _like(y, (n, k), np.float32)],
        attrs=(("num_experts", el * g), ("weights_owner_only", int(owner_only))),
        group=group,
    )
    return out, out_w


# ---------------------------------------------------------------------------------------------
# custom_vjp


def _handle_of(topk_idx, outs) -> DispatchHandle:
    _, _, _, counts, src_token, tpe, num_recv, num_dropped, gmax, _ = outs
    return DispatchHandle(topk_idx, counts, src_token, gmax, tpe, num_recv, num_dropped)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _dispatch_vjp(cfg, x, x_scales, topk_idx, topk_weights):
    return _dispatch_call(cfg, x, x_scales, topk_idx, topk_weights)


def _dispatch_fwd(cfg, x, x_scales, topk_idx, topk_weights):
    outs = _dispatch_call(cfg, x, x_scales, topk_idx, topk_weights)
    return outs, _handle_of(topk_idx, outs)


def _dispatch_bwd(cfg, handle, cts):
    """dx = combine(d recv_x); FP8 rows are straight-through as in HybridEP: d recv_x is combined
    in bfloat16 and rounded to e4m3, and the scales get no gradient."""
    ct_x, ct_w = cts[0], cts[2]
    fp8 = cfg.fp8_rows
    if fp8:
        ct_x = ct_x.astype(jnp.bfloat16)
    dx, dw = _combine_call(cfg, ct_x, handle, weights=ct_w, owner_only=True)
    return (dx.astype(_E4M3) if fp8 else dx), None, None, dw


_dispatch_vjp.defvjp(_dispatch_fwd, _dispatch_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _combine_vjp(cfg, y, handle):
    return _combine_call(cfg, y, handle)


def _combine_fwd(cfg, y, handle):
    return _combine_call(cfg, y, handle), handle


def _combine_bwd(cfg, handle, ct):
    dy = _cached_dispatch_call(cfg, ct, handle)
    return dy, jax.tree.map(lambda _: None, handle)


_combine_vjp.defvjp(_combine_fwd, _combine_bwd)


# ---------------------------------------------------------------------------------------------
# Public API


def dispatch(
    x,
    topk_idx,
    topk_weights,
    *,
    num_experts: int,
    axis_name: str,
    max_recv_tokens: int | None = None,
    check: bool = False,
    x_scales=None,
) -> Dispatched:
    """Send each token to the ranks owning its experts (DeepEP normal-mode dispatch).

    Args:
      x: [N, H] bfloat16, float16 or float32 tokens of this rank (H * itemsize a multiple of 16),
        or float8_e4m3fn rows with their `x_scales` (H % 128 == 0).
      topk_idx: [N, K] int32/int64 expert of each slot, -1 = none, else in [0, num_experts).
      topk_weights: [N, K] float32 routing weights (carried to the owning rank).
      num_experts: E, a multiple of the EP group size G (rank r owns experts [r*L, (r+1)*L)).
      axis_name: the EP mesh axis (bound by jax.shard_map).
      max_recv_tokens: C, rows of the receive-side outputs (default: the worst case G * N). Rows
        past C are dropped (highest source rank / token first) and counted in `num_dropped`.
      check: if True, a dropped row is an error raised through `jax.experimental.checkify` (wrap
        the jitted function with `checkify.checkify`).
      x_scales: [N, H/128] float32 per 1x128 block scales of a float8_e4m3fn x (DeepEP's FP8
        dispatch); they arrive in `recv_x_scales`, moved as they are.

    Returns:
      Dispatched(recv_x, recv_topk_idx, recv_topk_weights, tokens_per_expert, num_recv_tokens,
      handle, num_dropped, recv_x_scales). Gradients flow to x and topk_weights; with FP8 rows, x
      gets d recv_x combined in bfloat16 and rounded to e4m3 (straight-through, as HybridEP), and
      x_scales none.
    """
    g = axis_size(axis_name, "dispatch")
    x, topk_idx, topk_weights, capacity = check_dispatch(
        x, topk_idx, topk_weights, num_experts, g, max_recv_tokens, x_scales
    )
    x, x_scales, topk_idx, topk_weights = unify_vma(axis_name, x, x_scales, topk_idx, topk_weights)
    cfg = _Cfg(axis_name, int(num_experts), g, capacity, x_scales is not None)
    outs = _dispatch_vjp(cfg, x, x_scales, topk_idx, topk_weights)
    handle = _handle_of(topk_idx, outs)
    recv_x, recv_idx, recv_w, *_ = outs
    num_dropped = handle.num_dropped[0]
    num_recv = handle.num_kept[0] + num_dropped
    if check:
        from jax.experimental import checkify

        checkify.check(
            num_dropped == 0,
            "fused_a2a.dispatch dropped {d} received rows on this rank: max_recv_tokens="
            f"{capacity} is smaller than the rows it received",
            d=num_dropped,
        )
    return Dispatched(
        recv_x,
        recv_idx,
        recv_w,
        handle.tokens_per_expert,
        num_recv,
        handle,
        num_dropped,
        outs[9],
    )


def combine(y, handle: DispatchHandle, *, axis_name: str):
    """Send each row back to its source rank and sum per token (fp32, ranks ascending).

    Args:
      y: [C, H'] bfloat16, float16 or float32 rows, in the order `dispatch` delivered them (rows
        past num_recv_tokens are ignored). Experts apply routing weights themselves.
      handle: the `handle` of the matching `dispatch`.
      axis_name: the EP mesh axis.

    Returns:
      out [N, H'] of y's dtype; a token routed nowhere (or whose rows were all dropped) gets 0.
      The gradient of y is a cached dispatch of the gradient of out.
    """
    g = axis_size(axis_name, "combine")
    y, handle = check_combine(y, handle, g, DispatchHandle)
    y, *leaves = unify_vma(axis_name, y, *handle)
    handle = DispatchHandle(*leaves)
    cfg = _Cfg(axis_name, handle.tokens_per_expert.shape[0] * g, g, y.shape[0])
    return _combine_vjp(cfg, y, handle)


def layout(topk_idx, *, num_experts: int, num_ranks: int):
    """Local routing statistics (no communication).

    Returns (num_tokens_per_rank [G] int32, num_tokens_per_expert [E] int32,
    is_token_in_rank [N, G] bool). A token counts once per rank however many of its experts the
    rank owns; -1 slots are ignored.
    """
    topk_idx = check_layout(topk_idx, num_experts, num_ranks)
    n = topk_idx.shape[0]
    g, e = int(num_ranks), int(num_experts)
    return tuple(
        _ffi.call(
            "fa2a_layout",
            [topk_idx],
            [
                _like(topk_idx, (g,), np.int32),
                _like(topk_idx, (e,), np.int32),
                _like(topk_idx, (n, g), np.bool_),
            ],
            attrs=(("num_experts", e), ("num_ranks", g)),
        )
    )


def read_clock(*arrays):
    """(*arrays, clock): a nanosecond clock read once the device gets here, clock [2] uint32 (low,
    high 32 bits). XLA runs the read after the ops that produced `arrays` (at least one; their
    values are not read) and every op that uses the returned arrays (the same arrays, aliased:
    nothing is copied) after it, so the order holds through XLA's passes (an optimization barrier
    does not: XLA drops it before scheduling on CPU). On GPU the clock is the GPU's %globaltimer
    when the stream reaches the read, on CPU the host's steady clock. The difference of two reads
    on one device times the work between them on that device, without the host's overhead (the
    JAX bench's loops report it). Not differentiable."""
    if not arrays:
        raise ValueError("read_clock needs at least one array to order the read after, got none")
    ref = arrays[0]
    outs = _ffi.call(
        "fa2a_read_clock",
        list(arrays),
        [jax.typeof(a) for a in arrays] + [_like(ref, (2,), np.uint32)],
        aliases=tuple((i, i) for i in range(len(arrays))),
    )
    return tuple(outs)


def clock_ns(clock) -> int:
    """The nanoseconds of one read_clock result (host side: a NumPy or JAX array of 2 uint32)."""
    lo, hi = (int(v) for v in np.asarray(clock, dtype=np.uint32).reshape(2))
    return (hi << 32) | lo


__all__ = [
    "DispatchHandle",
    "Dispatched",
    "clock_ns",
    "combine",
    "dispatch",
    "layout",
    "read_clock",
]
