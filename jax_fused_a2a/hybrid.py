"""HybridEP mode for JAX: dispatch with permute, combine with unpermute (static shapes).

Semantics: SEMANTICS.md sections 2 and 3, docs/HYBRID.md and docs/JAX.md. Called inside
`jax.shard_map` (or wherever `axis_name` is bound to the EP mesh axis). Rows arrive on the rank
that owns their experts grouped by local expert (expert-major), zero-padded to `pad_multiple`,
in a static number of rows `num_permuted_tokens` (P); combine sums each token's expert outputs back
in a fixed order (ranks ascending, then local experts ascending, fp32, one rounding).
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
    FP8_BLOCK,
    _pvary,
    axis_size,
    check_hybrid_combine,
    check_hybrid_dispatch,
    rank_and_sub,
    unify_vma,
    vma_of,
)
from ._core import core_module

_E4M3 = np.dtype(jnp.float8_e4m3fn)
_META_TOTAL_ROWS, _META_OVERFLOW = 0, 1


@dataclasses.dataclass(frozen=True, eq=False)
class HybridHandle:
    """What hybrid_combine and the cached re-dispatch need (opaque to callers). A pytree: its
    arrays are leaves (none 0-d, so `out_specs=P(axis)` takes it out of a `shard_map`, and it can
    cross `jit` boundaries); `pad_multiple` is static. Shapes: N tokens, E = G * L experts,
    P = num_permuted_tokens."""

    routing_map: jax.Array  # [N, E] bool, this rank's routing (the forward's input)
    src_expert_counts: jax.Array  # [G*L] int32 rows from (source rank s, local expert j)
    row_token: jax.Array  # [P] int32 global token id (src_rank * N + t) of each row, -1 if none
    meta: jax.Array  # [4] int32: padded rows needed, overflow, N, largest fan-out
    tokens_per_expert: jax.Array  # [L] int32 padded counts, clipped to P
    pad_multiple: int = 0  # static; 0: no padding

    DATA_FIELDS = ("routing_map", "src_expert_counts", "row_token", "meta", "tokens_per_expert")

    @property
    def num_local_experts(self) -> int:
        return int(self.tokens_per_expert.shape[0])

    @property
    def num_permuted_tokens(self) -> int:
        return int(self.row_token.shape[0])

    @property
    def overflow(self) -> jax.Array:
        """bool []: the padded rows this rank receives did not fit P (rows were dropped)."""
        return self.meta[_META_OVERFLOW] != 0

    @property
    def num_needed_tokens(self) -> jax.Array:
        """int32 []: the padded rows this rank's routing needs (P that would fit exactly)."""
        return self.meta[_META_TOTAL_ROWS]


jax.tree_util.register_dataclass(
    HybridHandle, data_fields=list(HybridHandle.DATA_FIELDS), meta_fields=["pad_multiple"]
)


class HybridDispatched(NamedTuple):
    hidden: jax.Array  # [P, H] x.dtype (float8_e4m3fn with fp8), expert-major, zero padding/tail
    probs: jax.Array | None  # [P] float32 probs[g, r*L + j] of each row, 0 on padding; None
    scaling_factor: jax.Array | None  # [P, H/128] float32 with FP8 rows, else None
    tokens_per_expert: jax.Array  # [L] int32 padded counts, clipped so they sum to <= P
    handle: HybridHandle
    overflow: jax.Array  # bool []: rows did not fit num_permuted_tokens and were dropped


@dataclasses.dataclass(frozen=True)
class _Cfg:
    axis_name: str
    num_ranks: int  # G
    num_local: int  # L
    pad: int  # p (0: none)
    num_rows: int  # P
    quantize: bool  # fp8=True: quantise on the send side
    x_dtype: np.dtype  # the forward's x dtype (dispatch backward returns dx in it)
    has_probs: bool  # probs given (dispatch: [N,E]; combine: [P])


def _like(ref, shape, dtype):
    return jax.typeof(ref).update(shape=tuple(shape), dtype=np.dtype(dtype), weak_type=False)


def _group(cfg: _Cfg, h: int, itemsize: int):
    """The `group` of a HybridEP call: the buffer must hold one round of each HybridEP op."""
    bpv = max(int(itemsize), 2)
    min_slot = core_module().hybrid_buffer_bytes(int(h), bpv, cfg.num_local, 1, 0, 1)
    return (cfg.axis_name, int(h) * bpv, 0, int(min_slot))


def _absent(like):
    """A zero-size float32 operand standing for an absent optional input."""
    a = jnp.zeros((0,), jnp.float32)
    return _pvary(a, vma_of(like) - vma_of(a))


def _attrs(cfg: _Cfg, has_probs: bool):
    return (
        ("num_local_experts", cfg.num_local),
        ("pad_multiple", cfg.pad),
        ("has_probs", int(has_probs)),
        ("num_rows", cfg.num_rows),
    )


def _alloc_rows(rows: int) -> int:
    """Rows of the custom calls' [P, ...] buffers: max(P, 1), sliced back to P around the call
    (XLA on GPU crashed compiling a custom call whose results were all zero-sized, P = 0)."""
    return max(rows, 1)


def _pad_rows(a, rows: int, value=0):
    """a [P, ...] -> [max(P, 1), ...] (one row of `value` when P = 0)."""
    if a.shape[0] == _alloc_rows(rows):
        return a
    return jnp.concatenate([a, jnp.full((1,) + a.shape[1:], value, a.dtype)])


# ---------------------------------------------------------------------------------------------
# Raw calls (no autodiff)


def _dispatch_call(cfg: _Cfg, x, x_scales, routing_map, probs):
    h = x.shape[1]
    g, el, rows = cfg.num_ranks, cfg.num_local, cfg.num_rows
    alloc = _alloc_rows(rows)
    rank, sub = rank_and_sub(cfg.axis_name, like=x)
    fp8_rows = cfg.quantize or np.dtype(x.dtype) == _E4M3
    i32, f32 = np.int32, np.float32
    outs = _ffi.call(
        "fa2a_hybrid_dispatch",
        [
            rank,
            sub,
            x,
            _absent(x) if x_scales is None else x_scales,
            routing_map,
            _absent(x) if probs is None else probs,
        ],
        [
            _like(x, (alloc, h), _E4M3 if cfg.quantize else x.dtype),  # hidden
            _like(x, (alloc if probs is not None else 0,), f32),  # probs
            _like(x, (alloc, h // FP8_BLOCK) if fp8_rows else (0,), f32),  # scaling_factor
            _like(x, (g * el,), i32),  # src_expert_counts
            _like(x, (alloc,), i32),  # row_token
            _like(x, (el,), i32),  # tokens_per_expert
            _like(x, (4,), i32),  # meta
        ],
        attrs=_attrs(cfg, probs is not None) + (("quantize_fp8", int(cfg.quantize)),),
        group=_group(cfg, h, np.dtype(x.dtype).itemsize),
    )
    hidden, out_probs, scales, counts, row_token, tpe, meta = outs
    if alloc != rows:
        hidden, row_token = hidden[:rows], row_token[:rows]
        out_probs = out_probs[:rows] if probs is not None else out_probs
        scales = scales[:rows] if fp8_rows else scales
    return hidden, out_probs, scales, counts, row_token, tpe, meta


def _cached_dispatch_call(cfg: _Cfg, x, probs, handle: HybridHandle):
    """x [N,H] (and probs [N,E]) to the rows of the handle's dispatch: [P,H] (and [P])."""
    h, rows = x.shape[1], handle.num_permuted_tokens
    alloc = _alloc_rows(rows)
    rank, sub = rank_and_sub(cfg.axis_name, like=x)
    hidden, out_probs = _ffi.call(
        "fa2a_hybrid_cached_dispatch",
        [
            rank,
            sub,
            x,
            handle.routing_map,
            _absent(x) if probs is None else probs,
            handle.src_expert_counts,
            handle.meta,
        ],
        [
            _like(x, (alloc, h), x.dtype),
            _like(x, (alloc if probs is not None else 0,), np.float32),
        ],
        attrs=_attrs(cfg, probs is not None),
        group=_group(cfg, h, np.dtype(x.dtype).itemsize),
    )
    return hidden[:rows], (out_probs[:rows] if probs is not None else None)


def _combine_call(cfg: _Cfg, y, probs, handle: HybridHandle):
    """y [P,H] (and probs [P]) back to [N,H] (and [N,E])."""
    n, e = handle.routing_map.shape
    h = y.shape[1]
    if cfg.num_rows == 0:
        # P = 0 (a static of the program, the same on every rank): no rank holds a row, so the
        # combine moves nothing and out / combined_probs are zeros; no custom call. XLA's GPU
        # compiler segfaulted on programs whose combine call took P = 0 rows (run 23: exactly
        # the outputs computed by a combine, forward or dispatch backward, crashed it).
        # Varying over y's axes, as the custom call's results would be (custom_vjp types).
        out, out_probs, _ = unify_vma(
            cfg.axis_name, jnp.zeros((n, h), y.dtype), jnp.zeros((n, e), np.float32), y
        )
        return out, (out_probs if probs is not None else None)
    rank, sub = rank_and_sub(cfg.axis_name, like=y)
    out, out_probs = _ffi.call(
        "fa2a_hybrid_combine",
        [
            rank,
            sub,
            _pad_rows(y, cfg.num_rows),
            _absent(y) if probs is None else _pad_rows(probs, cfg.num_rows),
            handle.src_expert_counts,
            _pad_rows(handle.row_token, cfg.num_rows, -1),
            handle.meta,
        ],
        [_like(y, (n, h), y.dtype), _like(y, (n, e) if probs is not None else (0,), np.float32)],
        attrs=_attrs(cfg, probs is not None),
        group=_group(cfg, h, np.dtype(y.dtype).itemsize),
    )
    return out, (out_probs if probs is not None else None)


# ---------------------------------------------------------------------------------------------
# custom_vjp


def _handle_of(cfg: _Cfg, routing_map, outs) -> HybridHandle:
    _, _, _, counts, row_token, tpe, meta = outs
    return HybridHandle(routing_map, counts, row_token, meta, tpe, cfg.pad)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _dispatch_vjp(cfg, x, x_scales, routing_map, probs):
    return _dispatch_call(cfg, x, x_scales, routing_map, probs)


def _dispatch_fwd(cfg, x, x_scales, routing_map, probs):
    outs = _dispatch_call(cfg, x, x_scales, routing_map, probs)
    return outs, _handle_of(cfg, routing_map, outs)


def _dispatch_bwd(cfg, handle, cts):
    """dx, dprobs [N,E] = combine_with_unpermute(d hidden, probs = d probs). FP8 rows are
    straight-through: d hidden is combined in x's dtype (bfloat16 for an e4m3 x)."""
    ct_hidden, ct_probs = cts[0], cts[1]
    dtype = cfg.x_dtype if cfg.x_dtype != _E4M3 else np.dtype(jnp.bfloat16)
    dx, dprobs = _combine_call(
        cfg, ct_hidden.astype(dtype), ct_probs if cfg.has_probs else None, handle
    )
    return dx.astype(cfg.x_dtype), None, None, dprobs


_dispatch_vjp.defvjp(_dispatch_fwd, _dispatch_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _combine_vjp(cfg, y, probs, handle):
    return _combine_call(cfg, y, probs, handle)


def _combine_fwd(cfg, y, probs, handle):
    return _combine_call(cfg, y, probs, handle), handle


def _combine_bwd(cfg, handle, cts):
    """dy (and d probs [P]) = cached dispatch of d out (and d combined_probs); zeros on padding
    rows and the tail."""
    ct_out, ct_probs = cts
    dy, dprobs = _cached_dispatch_call(cfg, ct_out, ct_probs if cfg.has_probs else None, handle)
    return dy, dprobs, jax.tree.map(lambda _: None, handle)


_combine_vjp.defvjp(_combine_fwd, _combine_bwd)


# ---------------------------------------------------------------------------------------------
# Public API


def hybrid_dispatch(
    x,
    routing_map,
    probs,
    *,
    num_local_experts: int,
    num_permuted_tokens: int,
    pad_multiple: int | None = None,
    fp8: bool = False,
    axis_name: str,
    scaling_factor=None,
    check: bool = False,
) -> HybridDispatched:
    """Dispatch with permute (HybridEP): each token goes to the ranks owning its experts and
    arrives grouped by local expert, padded for grouped GEMMs.

    Args:
      x: [N, H] bfloat16, float16 or float32 tokens of this rank (N equal on every rank); or
        float8_e4m3fn rows with their `scaling_factor`.
      routing_map: [N, E] bool, E = G * num_local_experts; rank r owns experts [r*L, (r+1)*L).
      probs: [N, E] float32 routing probs (carried with the rows), or None.
      num_local_experts: L.
      num_permuted_tokens: P, the static number of rows of the outputs (required). Rows past the
        padded total are zeros; rows that do not fit are dropped (`overflow` is then True and
        `tokens_per_expert` is clipped). `max_permuted_tokens()` gives a P that always fits.
      pad_multiple: pad each local expert's rows with zero rows to a multiple of this (None or
        0: no padding).
      fp8: quantise the rows per 1x128 block to float8_e4m3fn on the send side (H % 128 == 0);
        `scaling_factor` of the result holds the float32 scales.
      axis_name: the EP mesh axis.
      scaling_factor: [N, H/128] float32 scales of a float8_e4m3fn x (moved as they are).
      check: if True, an overflow is an error raised through `jax.experimental.checkify`.

    Returns:
      HybridDispatched(hidden [P,H], probs [P] or None, scaling_factor [P,H/128] or None,
      tokens_per_expert [L] int32, handle, overflow bool []). Gradients flow to x and probs.
    """
    g = axis_size(axis_name, "hybrid_dispatch")
    el, rows, pad, fp8, check = check_hybrid_dispatch(
        x, routing_map, probs, scaling_factor, g, num_local_experts, num_permuted_tokens,
        pad_multiple, fp8, check,
    )  # fmt: skip
    x, scaling_factor, routing_map, probs = unify_vma(
        axis_name, x, scaling_factor, routing_map, probs
    )
    cfg = _Cfg(axis_name, g, el, pad, rows, fp8, np.dtype(x.dtype), probs is not None)
    outs = _dispatch_vjp(cfg, x, scaling_factor, routing_map, probs)
    handle = _handle_of(cfg, routing_map, outs)
    hidden, out_probs, scales = outs[0], outs[1], outs[2]
    if check:
        from jax.experimental import checkify

        checkify.check(
            jnp.logical_not(handle.overflow),
            "fused_a2a.hybrid_dispatch dropped rows on this rank: it needs {needed} permuted "
            f"rows but num_permuted_tokens={rows}",
            needed=handle.num_needed_tokens,
        )
    fp8_rows = fp8 or np.dtype(x.dtype) == _E4M3
    return HybridDispatched(
        hidden,
        out_probs if probs is not None else None,
        scales if fp8_rows else None,
        handle.tokens_per_expert,
        handle,
        handle.overflow,
    )


def hybrid_combine(y, handle: HybridHandle, *, axis_name: str, probs=None):
    """Combine with unpermute (HybridEP): each row goes back to its token's rank, and
    out[t] = sum over ranks rho ascending, then local experts j ascending, of y_rho[row(t, j)]
    (float32 accumulation, one rounding to y's dtype; padding and dropped rows ignored).

    Args:
      y: [P, H'] bfloat16, float16 or float32 rows in the order hybrid_dispatch delivered them.
      handle: the `handle` of the matching hybrid_dispatch.
      axis_name: the EP mesh axis.
      probs: optional [P] float32 per-row values to carry back (e.g. probs or their gradient).

    Returns:
      out [N, H'] of y's dtype; with probs, (out, combined_probs [N, E] float32: each row's value
      at (token, rank * L + local expert), 0 where not routed or dropped). The gradient of y is a
      cached re-dispatch of the gradient of out (zeros on padding rows).
    """
    g = axis_size(axis_name, "hybrid_combine")
    el = check_hybrid_combine(y, handle, probs, g, HybridHandle)
    leaves, treedef = jax.tree.flatten(handle)
    y, probs, *leaves = unify_vma(axis_name, y, probs, *leaves)
    handle = jax.tree.unflatten(treedef, leaves)
    cfg = _Cfg(
        axis_name, g, el, handle.pad_multiple, handle.num_permuted_tokens, False,
        np.dtype(y.dtype), probs is not None,
    )  # fmt: skip
    out, out_probs = _combine_vjp(cfg, y, probs, handle)
    return out if probs is None else (out, out_probs)


def max_permuted_tokens(
    num_tokens: int, num_ranks: int, num_local_experts: int, pad_multiple: int | None = None
) -> int:
    """A num_permuted_tokens that never overflows: every local expert receiving every one of the
    G * N tokens, padded (L * ceil(G*N / p) * p)."""
    per_expert = int(num_ranks) * int(num_tokens)
    p = int(pad_multiple or 0)
    if p > 0:
        per_expert = -(-per_expert // p) * p
    return int(num_local_experts) * per_expert


__all__ = [
    "HybridDispatched",
    "HybridHandle",
    "hybrid_combine",
    "hybrid_dispatch",
    "max_permuted_tokens",
]
