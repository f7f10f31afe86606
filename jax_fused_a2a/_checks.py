"""Trace-time argument checks and shard_map plumbing (rank operand, varying manual axes)."""

from __future__ import annotations

import numbers

import jax
import jax.numpy as jnp
import numpy as np

_ROW_DTYPES = (np.dtype(jnp.bfloat16), np.dtype(np.float16), np.dtype(np.float32))
_INDEX_DTYPES = (np.dtype(np.int32), np.dtype(np.int64))
_WIDEN_TO_I32 = (np.dtype(np.int8), np.dtype(np.int16), np.dtype(np.uint8), np.dtype(np.uint16))


def hidden_bytes(x) -> int:
    """Bytes per row as the buffer is sized (torch: `get_hidden_bytes`)."""
    return int(x.shape[1]) * max(np.dtype(x.dtype).itemsize, 2)


def axis_size(axis_name, op: str) -> int:
    if not isinstance(axis_name, str):
        raise TypeError(
            f"fused_a2a.{op}: axis_name must be a str (one mesh axis), got {axis_name!r}"
        )
    try:
        return int(jax.lax.axis_size(axis_name))
    except (NameError, KeyError, ValueError) as e:
        raise ValueError(
            f"fused_a2a.{op}: axis_name {axis_name!r} is not bound; call the op inside "
            f"jax.shard_map over a mesh with that axis ({e})"
        ) from e


def _dtype(x):
    return np.dtype(x.dtype)


def _check_static_int(value, name: str, op: str, minimum: int) -> int:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        raise TypeError(f"fused_a2a.{op}: {name} must be a Python int, got {value!r}")
    value = int(value)
    if value < minimum:
        raise ValueError(f"fused_a2a.{op}: {name} must be >= {minimum}, got {value}")
    if value > np.iinfo(np.int32).max:
        raise ValueError(f"fused_a2a.{op}: {name} must fit in int32, got {value}")
    return value


def _check_rows(x, name: str, op: str):
    if not hasattr(x, "shape") or not hasattr(x, "dtype"):
        raise TypeError(f"fused_a2a.{op}: {name} must be an array, got {type(x).__name__}")
    if x.ndim != 2:
        raise ValueError(
            f"fused_a2a.{op}: {name} must be 2-D [rows, hidden], got shape {tuple(x.shape)}"
        )
    if _dtype(x) not in _ROW_DTYPES:
        raise TypeError(
            f"fused_a2a.{op}: {name} must be bfloat16, float16 or float32, got {_dtype(x)}"
        )
    h, size = int(x.shape[1]), _dtype(x).itemsize
    if h == 0 or (h * size) % 16 != 0:
        raise ValueError(
            f"fused_a2a.{op}: {name} hidden size H * itemsize must be a positive "
            f"multiple of 16 bytes, got H={h} x {size} B = {h * size} B"
        )


def _check_index(idx, name: str, op: str, num_experts: int | None):
    if not hasattr(idx, "shape") or not hasattr(idx, "dtype"):
        raise TypeError(f"fused_a2a.{op}: {name} must be an array, got {type(idx).__name__}")
    dt = _dtype(idx)
    if dt in _WIDEN_TO_I32:
        idx = idx.astype(jnp.int32)  # exact
    elif dt not in _INDEX_DTYPES:
        raise TypeError(f"fused_a2a.{op}: {name} must be int32 or int64, got {dt}")
    if idx.ndim != 2:
        raise ValueError(f"fused_a2a.{op}: {name} must be 2-D [N, K], got shape {tuple(idx.shape)}")
    if idx.shape[1] < 1:
        raise ValueError(
            f"fused_a2a.{op}: {name} must have K >= 1 columns, got shape {tuple(idx.shape)}"
        )
    if num_experts is not None and not isinstance(idx, jax.core.Tracer):
        values = np.asarray(idx)
        bad = values[(values < -1) | (values >= num_experts)]
        if bad.size:
            raise ValueError(
                f"fused_a2a.{op}: {name} values must be -1 or in [0, num_experts="
                f"{num_experts}), got {int(bad.flat[0])}"
            )
    return idx


def _check_experts(num_experts, num_ranks: int, op: str) -> int:
    e = _check_static_int(num_experts, "num_experts", op, 1)
    if e % num_ranks != 0:
        raise ValueError(
            f"fused_a2a.{op}: num_experts={e} must be a multiple of the EP group size G={num_ranks}"
        )
    return e


def check_dispatch(x, topk_idx, topk_weights, num_experts, g: int, max_recv_tokens, x_scales=None):
    op = "dispatch"
    e = _check_experts(num_experts, g, op)
    if hasattr(x, "dtype") and _dtype(x) == _E4M3:  # FP8 rows with their 1x128 block scales
        if x.ndim != 2:
            raise ValueError(f"fused_a2a.{op}: x must be 2-D [N, H], got shape {tuple(x.shape)}")
        _check_fp8_rows(x, x_scales, "x_scales", op)
    else:
        _check_rows(x, "x", op)
        _check_no_scales(x, x_scales, "x_scales", op)
    topk_idx = _check_index(topk_idx, "topk_idx", op, e)
    n = int(x.shape[0])
    if n < 1:
        raise ValueError(
            f"fused_a2a.{op}: x must have at least one token, got shape {tuple(x.shape)}"
        )
    if topk_idx.shape[0] != n:
        raise ValueError(
            f"fused_a2a.{op}: topk_idx must have N={n} rows like x, got shape "
            f"{tuple(topk_idx.shape)}"
        )
    if not hasattr(topk_weights, "dtype") or _dtype(topk_weights) != np.float32:
        got = _dtype(topk_weights) if hasattr(topk_weights, "dtype") else type(topk_weights)
        raise TypeError(f"fused_a2a.{op}: topk_weights must be float32, got {got}")
    if tuple(topk_weights.shape) != tuple(topk_idx.shape):
        raise ValueError(
            f"fused_a2a.{op}: topk_weights shape {tuple(topk_weights.shape)} must "
            f"equal topk_idx shape {tuple(topk_idx.shape)}"
        )
    if max_recv_tokens is None:
        capacity = g * n
    else:
        capacity = _check_static_int(max_recv_tokens, "max_recv_tokens", op, 1)
    if g * n > np.iinfo(np.int32).max:
        raise ValueError(f"fused_a2a.{op}: G * N = {g * n} rows does not fit in int32")
    return x, topk_idx, topk_weights, capacity


def check_combine(y, handle, g: int, handle_type):
    op = "combine"
    if not isinstance(handle, tuple) or len(handle) != len(handle_type._fields):
        raise TypeError(
            f"fused_a2a.{op}: handle must be the DispatchHandle returned by "
            f"dispatch, got {type(handle).__name__}"
        )
    handle = handle_type(*handle)
    _check_rows(y, "y", op)
    for name, value in zip(handle_type._fields, handle, strict=False):
        if not hasattr(value, "dtype"):
            raise TypeError(
                f"fused_a2a.{op}: handle.{name} must be an array, got {type(value).__name__}"
            )
    idx = _check_index(handle.topk_idx, "handle.topk_idx", op, None)
    if idx is not handle.topk_idx:
        handle = handle._replace(topk_idx=idx)
    for name in handle_type._fields[1:]:
        if _dtype(getattr(handle, name)) != np.int32:
            raise TypeError(
                f"fused_a2a.{op}: handle.{name} must be int32, got {_dtype(getattr(handle, name))}"
            )
    if tuple(handle.recv_src_counts.shape) != (g,):
        raise ValueError(
            f"fused_a2a.{op}: handle.recv_src_counts must have shape ({g},) for "
            f"an EP group of {g} ranks, got {tuple(handle.recv_src_counts.shape)}; "
            "was the handle made over another axis?"
        )
    c = handle.recv_src_token.shape[0] if handle.recv_src_token.ndim == 1 else -1
    if int(y.shape[0]) != c:
        raise ValueError(
            f"fused_a2a.{op}: y must have C={c} rows (dispatch's max_recv_tokens), "
            f"got shape {tuple(y.shape)}"
        )
    for name in ("group_max_tokens", "num_kept", "num_dropped"):
        if tuple(getattr(handle, name).shape) != (1,):
            raise ValueError(
                f"fused_a2a.{op}: handle.{name} must have shape (1,), got "
                f"{tuple(getattr(handle, name).shape)}"
            )
    if handle.tokens_per_expert.ndim != 1:
        raise ValueError(f"fused_a2a.{op}: handle.tokens_per_expert must be 1-D [L]")
    return y, handle


def check_layout(topk_idx, num_experts, num_ranks):
    op = "layout"
    g = _check_static_int(num_ranks, "num_ranks", op, 1)
    e = _check_experts(num_experts, g, op)
    return _check_index(topk_idx, "topk_idx", op, e)


# ---------------------------------------------------------------------------------------------
# shard_map plumbing


def vma_of(x) -> frozenset:
    aval = jax.typeof(x)
    vma = getattr(aval, "vma", None)
    if vma is None:
        mat = getattr(aval, "mat", None)
        vma = getattr(mat, "varying", None)
    return frozenset(vma or ())


def _pvary(x, axes):
    if not axes:
        return x
    axes = tuple(sorted(axes, key=str))
    if hasattr(jax.lax, "pcast"):
        return jax.lax.pcast(x, axes, to="varying")
    return jax.lax.pvary(x, axes)  # pragma: no cover - jax < 0.8


def unify_vma(axis_name: str, *xs):
    """Make every operand varying over the same manual axes (those of any operand, plus the EP
    axis when check_vma is on), as the FFI call's type rule requires. None operands (absent
    optional inputs) stay None."""
    present = [x for x in xs if x is not None]
    target = frozenset().union(*(vma_of(x) for x in present))
    target |= vma_of(jax.lax.axis_index(axis_name))
    return tuple(None if x is None else _pvary(x, target - vma_of(x)) for x in xs)


def _other_axes(axis_name: str):
    """[(name, size)] of the mesh axes other than `axis_name`, in mesh order; checks that every
    one of size > 1 is manual (bound by shard_map)."""
    try:
        mesh = jax.sharding.get_abstract_mesh()
    except AttributeError:  # pragma: no cover
        from jax._src.mesh import get_abstract_mesh

        mesh = get_abstract_mesh()
    if mesh is None or getattr(mesh, "empty", True):
        return []
    manual = set(getattr(mesh, "manual_axes", ()) or ())
    out = []
    for name, size in zip(mesh.axis_names, mesh.axis_sizes, strict=False):
        if name == axis_name or size == 1:
            continue
        if manual and name not in manual:
            raise NotImplementedError(
                f"fused_a2a: mesh axis {name!r} (size {size}) is not manual in this shard_map; "
                f"put every mesh axis in shard_map's axis_names (the op runs per EP group of "
                f"axis {axis_name!r})"
            )
        out.append((name, int(size)))
    return out


def rank_and_sub(axis_name: str, like):
    """int32 scalars: the rank along `axis_name` and the index of this device's EP group among the
    groups of the mesh (0 for a 1-D mesh), typed like `like` (same varying axes)."""
    rank = jax.lax.axis_index(axis_name).astype(jnp.int32)
    sub = jnp.zeros((), jnp.int32)
    stride = 1
    for name, size in reversed(_other_axes(axis_name)):
        sub = sub + jax.lax.axis_index(name).astype(jnp.int32) * stride
        stride *= size
    target = vma_of(like)
    rank = _pvary(rank, target - vma_of(rank))
    sub = _pvary(sub, target - vma_of(sub))
    return rank, sub


# ---------------------------------------------------------------------------------------------
# HybridEP mode

_E4M3 = np.dtype(jnp.float8_e4m3fn)
FP8_BLOCK = 128


def _check_fp8_rows(x, scales, scales_name: str, op: str):
    """float8_e4m3fn x [N, H] (2-D, checked by the caller) with its per 1x128 block scales."""
    n, h = (int(d) for d in x.shape)
    if h == 0 or h % FP8_BLOCK:
        raise ValueError(
            f"fused_a2a.{op}: FP8 rows need H % {FP8_BLOCK} == 0, got x shape {(n, h)}"
        )
    if scales is None:
        raise ValueError(
            f"fused_a2a.{op}: x of dtype float8_e4m3fn needs {scales_name} [N, H/128] float32 "
            "(its per 1x128 block scales)"
        )
    _check_f32(scales, scales_name, op, (n, h // FP8_BLOCK), "[N, H/128]")


def _check_no_scales(x, scales, scales_name: str, op: str):
    if scales is not None:
        raise ValueError(
            f"fused_a2a.{op}: {scales_name} is only for float8_e4m3fn x, x is {_dtype(x)}"
        )


def _check_bool_flag(value, name: str, op: str) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"fused_a2a.{op}: {name} must be a Python bool, got {value!r}")
    return bool(value)


def _check_f32(a, name: str, op: str, shape: tuple, what: str):
    if not hasattr(a, "shape") or not hasattr(a, "dtype"):
        raise TypeError(f"fused_a2a.{op}: {name} must be an array, got {type(a).__name__}")
    if _dtype(a) != np.float32:
        raise TypeError(f"fused_a2a.{op}: {name} must be float32, got {_dtype(a)}")
    if tuple(a.shape) != tuple(shape):
        raise ValueError(
            f"fused_a2a.{op}: {name} must have shape {what} = {tuple(shape)}, got {tuple(a.shape)}"
        )


def check_hybrid_dispatch(
    x, routing_map, probs, scaling_factor, g, num_local_experts, num_permuted_tokens,
    pad_multiple, fp8, check,
):  # fmt: skip
    """-> (num_local_experts, num_permuted_tokens, pad_multiple (0: none), fp8, check)."""
    op = "hybrid_dispatch"
    el = _check_static_int(num_local_experts, "num_local_experts", op, 1)
    if num_permuted_tokens is None:
        raise TypeError(
            f"fused_a2a.{op}: num_permuted_tokens is required: a static Python int P, the rows "
            "of the permuted outputs (JAX needs static shapes); rows past the P this rank "
            "receives are zeros, rows that do not fit are dropped and reported in `overflow` "
            "(max_permuted_tokens() gives a size that never overflows)"
        )
    rows = _check_static_int(num_permuted_tokens, "num_permuted_tokens", op, 0)
    pad = 0 if pad_multiple is None else _check_static_int(pad_multiple, "pad_multiple", op, 0)
    fp8 = _check_bool_flag(fp8, "fp8", op)
    check = _check_bool_flag(check, "check", op)
    if not hasattr(x, "shape") or not hasattr(x, "dtype"):
        raise TypeError(f"fused_a2a.{op}: x must be an array, got {type(x).__name__}")
    if x.ndim != 2:
        raise ValueError(f"fused_a2a.{op}: x must be 2-D [N, H], got shape {tuple(x.shape)}")
    n, h = (int(d) for d in x.shape)
    if _dtype(x) == _E4M3:
        if fp8:
            raise ValueError(
                f"fused_a2a.{op}: x is already float8_e4m3fn; fp8=True quantises bfloat16, "
                "float16 or float32 rows (pass e4m3 rows with their scaling_factor, fp8=False)"
            )
        _check_fp8_rows(x, scaling_factor, "scaling_factor", op)
    else:
        _check_rows(x, "x", op)
        _check_no_scales(x, scaling_factor, "scaling_factor", op)
        if fp8 and h % FP8_BLOCK:
            raise ValueError(
                f"fused_a2a.{op}: fp8=True needs the hidden size H % {FP8_BLOCK} == 0 "
                f"(1x{FP8_BLOCK} quantisation blocks), got H={h}"
            )
    e = g * el
    if not hasattr(routing_map, "shape") or not hasattr(routing_map, "dtype"):
        raise TypeError(
            f"fused_a2a.{op}: routing_map must be an array, got {type(routing_map).__name__}"
        )
    if _dtype(routing_map) != np.bool_:
        raise TypeError(f"fused_a2a.{op}: routing_map must be bool, got {_dtype(routing_map)}")
    if tuple(routing_map.shape) != (n, e):
        raise ValueError(
            f"fused_a2a.{op}: routing_map must have shape [N, E] = {(n, e)} (E = G={g} x "
            f"num_local_experts={el}), got {tuple(routing_map.shape)}"
        )
    if probs is not None:
        _check_f32(probs, "probs", op, (n, e), "[N, E]")
    if g * n > np.iinfo(np.int32).max:
        raise ValueError(f"fused_a2a.{op}: G * N = {g * n} tokens do not fit int32 token ids")
    return el, rows, pad, fp8, check


def check_hybrid_combine(y, handle, probs, g: int, handle_type):
    op = "hybrid_combine"
    if not isinstance(handle, handle_type):
        raise TypeError(
            f"fused_a2a.{op}: handle must be the HybridHandle returned by hybrid_dispatch, got "
            f"{type(handle).__name__}"
        )
    for name in handle_type.DATA_FIELDS:
        value = getattr(handle, name)
        if not hasattr(value, "dtype"):
            raise TypeError(
                f"fused_a2a.{op}: handle.{name} must be an array, got {type(value).__name__}"
            )
        want = np.bool_ if name == "routing_map" else np.int32
        if _dtype(value) != want:
            raise TypeError(
                f"fused_a2a.{op}: handle.{name} must be {np.dtype(want)}, got {_dtype(value)}"
            )
    _check_rows(y, "y", op)
    el = int(handle.tokens_per_expert.shape[0]) if handle.tokens_per_expert.ndim == 1 else -1
    if el < 1 or tuple(handle.src_expert_counts.shape) != (g * el,):
        raise ValueError(
            f"fused_a2a.{op}: handle.src_expert_counts must have shape (G*L,) = ({g * el},) for "
            f"an EP group of {g} ranks and L={el}, got {tuple(handle.src_expert_counts.shape)}; "
            "was the handle made over another axis?"
        )
    if handle.routing_map.ndim != 2 or handle.routing_map.shape[1] != g * el:
        raise ValueError(
            f"fused_a2a.{op}: handle.routing_map must be [N, {g * el}], got "
            f"{tuple(handle.routing_map.shape)}"
        )
    if tuple(handle.meta.shape) != (4,):
        raise ValueError(f"fused_a2a.{op}: handle.meta must have shape (4,)")
    p = int(handle.row_token.shape[0]) if handle.row_token.ndim == 1 else -1
    if int(y.shape[0]) != p:
        raise ValueError(
            f"fused_a2a.{op}: y must have the dispatch's P={p} rows (num_permuted_tokens), got "
            f"shape {tuple(y.shape)}"
        )
    if probs is not None:
        _check_f32(probs, "probs", op, (p,), "[P]")
    return el
