"""Drop-in for the HybridEP section of Megatron's ``moe/fused_a2a.py`` (SEMANTICS.md section 2).

Dispatch with permute: tokens arrive grouped by local expert (expert-major) and padded to
``pad_multiple`` for grouped GEMMs; combine with unpermute brings expert outputs back and sums them
per token in a fixed order (ranks ascending, then local experts ascending, fp32, one rounding).
``num_permuted_tokens=None`` sizes the output exactly (one host sync after the notify phase); an
int gives a static size with no host sync (zero tail, overflow flag in the handle, clipped counts).

Same names, argument order, defaults and return tuples as upstream, on fused_a2a's kernels: CPU
tensors over gloo groups (CUDA HybridEP kernels are not there yet). Unlike upstream,
``fp8_dispatch=True`` works: f32/f16/bf16 input is quantised per 1x128 block to float8_e4m3fn on
the send side and ``dispatched_scaling_factor`` carries the f32 scales.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.distributed as dist

import fused_a2a_core as core
from fused_a2a._common import PLATFORM_CUDA
from torch_fused_a2a import _hybrid_ops, _ops  # _hybrid_ops registers torch.ops.fused_a2a.hybrid_*
from torch_fused_a2a._buffers import Buffer, create_buffer, default_device, platform_of

_DEFAULT_NUM_SMS = 24


@dataclass
class HybridEPBuffer:
    """The process-wide HybridEP buffer (what upstream keeps in ``_hybrid_ep_buffer``).

    ``rows`` is the number of tokens one round of the CPU exchange carries (fixed at creation:
    larger inputs take more rounds, not more memory); the buffer grows only when a call needs more
    bytes per row (a larger hidden size, wider dtype or more local experts)."""

    group: object
    buffer: Buffer
    hidden_dim: int
    seq_len: int
    num_local_experts: int
    num_sms_dispatch_api: int
    num_sms_combine_api: int
    fp8_dispatch: bool
    bytes_per_value: int
    rows: int

    @property
    def device(self) -> torch.device:
        return self.buffer.device

    @property
    def num_bytes(self) -> int:
        return self.buffer.num_nvl_bytes

    def bytes_held(self) -> int:
        return self.buffer.bytes_held()

    def needed_bytes(self, hidden: int, bytes_per_value: int, num_local_experts: int) -> int:
        b = self.buffer
        return core.hybrid_buffer_bytes(
            hidden, bytes_per_value, num_local_experts, b.num_ranks, b.platform, self.rows
        )

    def unusable_or_small(self, hidden: int, bytes_per_value: int, num_local_experts: int) -> bool:
        """Released, poisoned by a failed collective, or too small for this call."""
        if self.buffer.released or self.buffer.poisoned():
            return True
        return self.num_bytes < self.needed_bytes(hidden, bytes_per_value, num_local_experts)


_hybrid_ep_buffer: HybridEPBuffer | None = None
_growth_warned = False


class HybridEPHandle(NamedTuple):
    """What combine and the cached re-dispatch need (opaque to callers)."""

    routing_map: torch.Tensor  # [N, E] bool, this rank's routing (the forward's input)
    src_expert_counts: torch.Tensor  # [G*L] int32 rows from each (source rank, local expert)
    row_token: torch.Tensor  # [P] int32 global token id (src_rank * N + t) of each row, -1 pad
    meta: torch.Tensor  # [4] int32: padded total rows, overflow, N, max fan-out
    tokens_per_expert: torch.Tensor  # [L] int32 padded, clipped counts (on the device)
    num_tokens: int  # N
    num_local_experts: int  # L
    num_permuted_tokens: int  # P
    pad_multiple: int  # 0: no padding
    group: object

    @property
    def overflow(self) -> bool:
        """True when a static ``num_permuted_tokens`` was too small and rows were dropped."""
        return bool(self.meta[_hybrid_ops.META_OVERFLOW].item())

    @property
    def num_needed_tokens(self) -> int:
        """The padded row count the routing needs (P when sized exactly)."""
        return int(self.meta[_hybrid_ops.META_TOTAL_ROWS].item())


# ------------------------------------------------------------------------------- checks


def _as_count(value):
    """Upstream callers pass counts such as ``tokens_per_expert.sum()``: a one-element integer
    tensor becomes an int (a host read, as upstream does); anything else is left for the checks."""
    if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.is_floating_point():
        return int(value.item())
    return value


def _check_int(value, name: str, minimum: int, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        what = "None or an int" if allow_none else "an int"
        raise ValueError(f"{name} must be {what} >= {minimum}, got {value!r}")


def _check_num_sms(value, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0 or value % 2:
        raise ValueError(f"{name} must be a positive even int, got {value!r}")
    if torch.cuda.is_available():
        count = torch.cuda.get_device_properties(torch.cuda.current_device()).multi_processor_count
        if value > count:
            raise ValueError(f"{name}={value} exceeds the device's {count} SMs")


def _check_tensor_2d(tensor, name: str) -> None:
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if tensor.dim() != 2:
        raise ValueError(f"{name} must be 2-D, got shape {tuple(tensor.shape)}")
    if not tensor.is_contiguous():
        raise ValueError(f"{name} must be contiguous, got strides {tensor.stride()}")


_FLOATS = (torch.float32, torch.float16, torch.bfloat16)


def _check_dispatch(
    x,
    routing_map,
    probs,
    group,
    num_local_experts,
    pad_multiple,
    num_permuted_tokens,
    scaling_factor,
) -> None:
    _check_tensor_2d(x, "x")
    if x.dtype not in _FLOATS + (torch.float8_e4m3fn,):
        raise TypeError(f"x must be float32, float16, bfloat16 or float8_e4m3fn, got {x.dtype}")
    _check_int(num_local_experts, "num_local_experts", 1)
    _check_int(pad_multiple, "pad_multiple", 0, allow_none=True)
    _check_int(num_permuted_tokens, "num_permuted_tokens", 0, allow_none=True)
    num_experts = dist.get_world_size(group) * num_local_experts
    expected = (x.shape[0], num_experts)
    _check_tensor_2d(routing_map, "routing_map")
    if routing_map.dtype != torch.bool:
        raise TypeError(f"routing_map must be torch.bool, got {routing_map.dtype}")
    if tuple(routing_map.shape) != expected:
        raise ValueError(
            f"routing_map must have shape [N, E] = {list(expected)} (E = group size x "
            f"num_local_experts), got {list(routing_map.shape)}"
        )
    if probs is not None:
        _check_tensor_2d(probs, "probs")
        if probs.dtype != torch.float32:
            raise TypeError(f"probs must be float32, got {probs.dtype}")
        if tuple(probs.shape) != expected:
            raise ValueError(f"probs must have shape {list(expected)}, got {list(probs.shape)}")
    if x.dtype == torch.float8_e4m3fn:
        if scaling_factor is None:
            raise ValueError("x of dtype float8_e4m3fn needs scaling_factor [N, H/128] float32")
        _check_tensor_2d(scaling_factor, "scaling_factor")
        if scaling_factor.dtype != torch.float32 or tuple(scaling_factor.shape) != (
            x.shape[0],
            x.shape[1] // 128,
        ):
            raise ValueError(
                f"scaling_factor must be float32 [N, H/128] = {[x.shape[0], x.shape[1] // 128]}, "
                f"got {scaling_factor.dtype} {list(scaling_factor.shape)}"
            )
    elif scaling_factor is not None:
        raise ValueError(f"scaling_factor is only for float8_e4m3fn x, x is {x.dtype}")
    for name, t in (
        ("routing_map", routing_map),
        ("probs", probs),
        ("scaling_factor", scaling_factor),
    ):
        if t is not None and t.device != x.device:
            raise ValueError(f"{name} is on {t.device}, x on {x.device}")


# ------------------------------------------------------------------------------- buffer


def _bytes_per_value(dtype: torch.dtype) -> int:
    return max(torch.empty((), dtype=dtype).element_size(), 2)


def _create(group, device, rows=None, **config) -> HybridEPBuffer:
    """Collective. ``config``: the HybridEPBuffer fields after ``buffer``. Ranks may ask for
    different sizes (lazy init from unequal N): the all-gathered maximum is used, so that every
    rank's buffer has the same layout."""
    platform, _ = platform_of(device)
    world = dist.get_world_size(group)
    if rows is None:
        # GPUs: the default whatever seq_len. Every round costs a grid-wide handshake with every
        # peer, and a combine round carries only slot rows / (largest fan-out) tokens: a buffer
        # made lazily by a first call with N = 128 left the N = 4096 combine at 256 rounds, 11.8
        # ms against 2.9 ms with 4096 rows (run 25, 4x H200). CPUs: min(seq_len, default) keeps
        # small tests at several rounds.
        rows = core.default_buffer_rows(platform)  # tokens a round (CPU: at most seq_len)
        if platform != PLATFORM_CUDA:
            rows = max(1, min(int(config["seq_len"]), rows))
    size = core.hybrid_buffer_bytes(
        config["hidden_dim"], config["bytes_per_value"], config["num_local_experts"], world,
        platform, rows,
    )  # fmt: skip
    wanted: list = [None] * world
    dist.all_gather_object(wanted, (size, rows), group=group)
    size, rows = max(w[0] for w in wanted), max(w[1] for w in wanted)
    config["fp8_dispatch"] = bool(config["fp8_dispatch"])
    return HybridEPBuffer(
        group, create_buffer(group, size, device, tag="hybrid"), rows=rows, **config
    )


def init_hybrid_ep_buffer(
    group,
    hidden_dim: int,
    seq_len: int,
    num_local_experts: int,
    num_sms_dispatch_api: int,
    num_sms_combine_api: int,
    fp8_dispatch: bool,
) -> None:
    """Initialise the HybridEP buffer (collective over ``group``).

    A later dispatch/combine that needs more room grows the buffer (collectively, with a one-time
    warning). ``fp8_dispatch=True`` makes later dispatches quantise f32/f16/bf16 input to e4m3
    per 1x128 block (hidden_dim % 128 == 0)."""
    global _hybrid_ep_buffer
    _check_int(hidden_dim, "hidden_dim", 1)
    _check_int(seq_len, "seq_len", 0)
    _check_int(num_local_experts, "num_local_experts", 1)
    _check_num_sms(num_sms_dispatch_api, "num_sms_dispatch_api")
    _check_num_sms(num_sms_combine_api, "num_sms_combine_api")
    if fp8_dispatch and hidden_dim % 128:
        raise ValueError(f"fp8_dispatch needs hidden_dim % 128 == 0, got hidden_dim={hidden_dim}")
    old = _hybrid_ep_buffer
    _hybrid_ep_buffer = _create(
        group, default_device(group), hidden_dim=hidden_dim, seq_len=seq_len,
        num_local_experts=num_local_experts, num_sms_dispatch_api=num_sms_dispatch_api,
        num_sms_combine_api=num_sms_combine_api, fp8_dispatch=fp8_dispatch, bytes_per_value=2,
    )  # fmt: skip
    if old is not None:
        old.buffer.release()


def reset_hybrid_ep_buffer() -> None:
    """Drop the HybridEP buffer and free its memory; the next dispatch initialises a new one."""
    global _hybrid_ep_buffer
    old, _hybrid_ep_buffer = _hybrid_ep_buffer, None
    if old is not None:
        old.buffer.release()


def _ensure_buffer(
    group, device, hidden, dtype, num_local_experts, num_tokens, num_sms_dispatch, num_sms_combine
) -> HybridEPBuffer:
    """The buffer for this call: lazily initialised, re-created for another group or device or
    after a failure, grown (with a one-time warning) when the call needs more bytes per row."""
    global _hybrid_ep_buffer, _growth_warned
    current = _hybrid_ep_buffer
    bpv = _bytes_per_value(dtype)
    if current is None or current.group is not group or current.device != device:
        _hybrid_ep_buffer = _create(
            group, device, hidden_dim=hidden, seq_len=num_tokens,
            num_local_experts=num_local_experts, num_sms_dispatch_api=num_sms_dispatch,
            num_sms_combine_api=num_sms_combine, bytes_per_value=bpv,
            fp8_dispatch=current.fp8_dispatch if current is not None else False,
        )  # fmt: skip
    elif current.unusable_or_small(hidden, bpv, num_local_experts):
        if not (current.buffer.released or current.buffer.poisoned() or _growth_warned):
            _growth_warned = True
            warnings.warn(
                f"fused_a2a HybridEP: growing the buffer ({current.num_bytes} bytes, made for "
                f"hidden_dim={current.hidden_dim}, {current.bytes_per_value} bytes per value, "
                f"{current.num_local_experts} local experts) for hidden={hidden}, {dtype}, "
                f"{num_local_experts} local experts; pass larger sizes to init_hybrid_ep_buffer "
                "to avoid re-allocating at run time",
                stacklevel=4,
            )
        _hybrid_ep_buffer = _create(
            group, device, rows=current.rows, hidden_dim=max(hidden, current.hidden_dim),
            seq_len=current.seq_len,
            num_local_experts=max(num_local_experts, current.num_local_experts),
            num_sms_dispatch_api=current.num_sms_dispatch_api,
            num_sms_combine_api=current.num_sms_combine_api, fp8_dispatch=current.fp8_dispatch,
            bytes_per_value=max(bpv, current.bytes_per_value),
        )  # fmt: skip
    if current is not None and _hybrid_ep_buffer is not current:
        current.buffer.release()
    return _hybrid_ep_buffer


# ------------------------------------------------------------------------------- ops


def _dispatch(
    x,
    routing_map,
    probs,
    group,
    num_local_experts,
    num_sms_dispatch,
    num_sms_combine,
    num_permuted_tokens,
    pad_multiple,
    scaling_factor,
):
    buf = _ensure_buffer(
        group,
        x.device,
        x.shape[1],
        x.dtype,
        num_local_experts,
        x.shape[0],
        num_sms_dispatch,
        num_sms_combine,
    )
    quantize = buf.fp8_dispatch and x.dtype != torch.float8_e4m3fn
    if quantize and x.shape[1] % 128:
        raise ValueError(f"fp8_dispatch needs x's hidden size % 128 == 0, got {x.shape[1]}")
    pad = int(pad_multiple or 0)
    rows = -1 if num_permuted_tokens is None else int(num_permuted_tokens)
    b = buf.buffer
    hidden, out_probs, scales, counts, row_token, per_expert, meta, host_counts = _ops.run(
        _hybrid_ops.hybrid_dispatch,
        x,
        scaling_factor,
        routing_map,
        probs,
        num_local_experts,
        pad,
        rows,
        quantize,
        b.group_id,
        b.rank,
        b.num_ranks,
        num_sms_dispatch,
    )
    handle = HybridEPHandle(
        routing_map,
        counts,
        row_token,
        meta,
        per_expert,
        x.shape[0],
        num_local_experts,
        row_token.shape[0],
        pad,
        group,
    )
    fp8 = quantize or x.dtype == torch.float8_e4m3fn
    scales = scales if fp8 else None
    # dynamic P: the CPU copy of tokens_per_expert that the notify phase wrote (empty otherwise)
    return hidden, out_probs if probs is not None else None, scales, handle, host_counts


def _combine(y, handle: HybridEPHandle, probs=None, num_sms=None):
    buf = _ensure_buffer(
        handle.group,
        y.device,
        y.shape[1],
        y.dtype,
        handle.num_local_experts,
        handle.num_tokens,
        _DEFAULT_NUM_SMS,
        _DEFAULT_NUM_SMS,
    )
    b = buf.buffer
    return _ops.run(
        _hybrid_ops.hybrid_combine,
        y,
        probs,
        handle.src_expert_counts,
        handle.row_token,
        handle.meta,
        handle.num_local_experts,
        handle.pad_multiple,
        handle.num_tokens,
        b.group_id,
        b.rank,
        num_sms or buf.num_sms_combine_api,
    )


def _cached_dispatch(x, handle: HybridEPHandle):
    buf = _ensure_buffer(
        handle.group,
        x.device,
        x.shape[1],
        x.dtype,
        handle.num_local_experts,
        handle.num_tokens,
        _DEFAULT_NUM_SMS,
        _DEFAULT_NUM_SMS,
    )
    b = buf.buffer
    return _ops.run(
        _hybrid_ops.hybrid_cached_dispatch,
        x,
        handle.routing_map,
        handle.src_expert_counts,
        handle.row_token,
        handle.meta,
        handle.num_local_experts,
        handle.pad_multiple,
        b.group_id,
        b.rank,
        buf.num_sms_dispatch_api,
    )


class HybridEPDispatch(torch.autograd.Function):
    """Fused permute + dispatch all-to-all (HybridEP). Returns (dispatched_hidden,
    dispatched_probs, dispatched_scaling_factor or None, tokens_per_expert, handle)."""

    @staticmethod
    def forward(
        ctx,
        x,
        routing_map,
        probs,
        group,
        num_local_experts,
        num_sms_dispatch_api=24,
        num_sms_combine_api=24,
        num_permuted_tokens=None,
        pad_multiple=None,
        scaling_factor=None,
    ):
        num_permuted_tokens = _as_count(num_permuted_tokens)
        num_sms_dispatch_api = num_sms_dispatch_api or _DEFAULT_NUM_SMS
        num_sms_combine_api = num_sms_combine_api or _DEFAULT_NUM_SMS
        _check_num_sms(num_sms_dispatch_api, "num_sms_dispatch_api")
        _check_num_sms(num_sms_combine_api, "num_sms_combine_api")
        _check_dispatch(
            x,
            routing_map,
            probs,
            group,
            num_local_experts,
            pad_multiple,
            num_permuted_tokens,
            scaling_factor,
        )
        hidden, out_probs, scales, handle, host_counts = _dispatch(
            x,
            routing_map,
            probs,
            group,
            num_local_experts,
            num_sms_dispatch_api,
            num_sms_combine_api,
            num_permuted_tokens,
            pad_multiple,
            scaling_factor,
        )
        if num_permuted_tokens is None:  # on the host since the notify phase: no device sync
            tokens_per_expert = host_counts.to(torch.int64)
        else:
            tokens_per_expert = handle.tokens_per_expert.to(torch.int64)
        ctx.handle, ctx.x_dtype, ctx.has_probs = handle, x.dtype, probs is not None
        ctx.num_sms_combine, ctx.hidden_size = num_sms_combine_api, x.shape[1]
        ctx.mark_non_differentiable(tokens_per_expert)
        if scales is not None:
            ctx.mark_non_differentiable(scales)
        return hidden, out_probs, scales, tokens_per_expert, handle

    @staticmethod
    def backward(
        ctx, grad_hidden, grad_probs, grad_scaling_factor, grad_tokens_per_expert, grad_handle
    ):
        handle = ctx.handle
        # FP8 dispatch: the quantisation is treated as the identity (straight-through); the
        # gradient is combined in x's dtype.
        dtype = ctx.x_dtype if ctx.x_dtype in _FLOATS else torch.bfloat16
        rows, device = handle.num_permuted_tokens, handle.routing_map.device
        if grad_hidden is None:  # every rank still takes part in the collective
            hidden = torch.zeros((rows, ctx.hidden_size), dtype=dtype, device=device)
        else:
            hidden = grad_hidden.to(dtype).contiguous()
        probs = None
        if ctx.has_probs:
            probs = grad_probs if grad_probs is not None else torch.zeros(rows, device=device)
            probs = probs.to(torch.float32).contiguous()
        grad_x, grad_probs_out = _combine(hidden, handle, probs, ctx.num_sms_combine)
        return (
            grad_x,
            None,
            grad_probs_out if ctx.has_probs else None,
            None,
            None,
            None,
            None,
            None,
            None,
            None,
        )


class HybridEPCombine(torch.autograd.Function):
    """Fused unpermute + combine all-to-all (HybridEP). Returns combined_hidden [N, H]."""

    @staticmethod
    def forward(ctx, x, handle, num_permuted_tokens=None, pad_multiple=None):
        if not isinstance(handle, HybridEPHandle):
            raise TypeError(
                f"handle must come from hybrid_ep_dispatch, got {type(handle).__name__}"
            )
        _check_tensor_2d(x, "x")
        if x.dtype not in _FLOATS:
            raise TypeError(f"x must be float32, float16 or bfloat16, got {x.dtype}")
        num_permuted_tokens = _as_count(num_permuted_tokens)
        _check_int(num_permuted_tokens, "num_permuted_tokens", 0, allow_none=True)
        _check_int(pad_multiple, "pad_multiple", 0, allow_none=True)
        if x.shape[0] != handle.num_permuted_tokens:
            raise ValueError(
                f"x must have the dispatch's {handle.num_permuted_tokens} rows "
                f"(num_permuted_tokens), got {x.shape[0]}"
            )
        if num_permuted_tokens is not None and num_permuted_tokens != handle.num_permuted_tokens:
            raise ValueError(
                f"num_permuted_tokens={num_permuted_tokens} differs from the dispatch's "
                f"{handle.num_permuted_tokens}"
            )
        if pad_multiple is not None and int(pad_multiple) != handle.pad_multiple:
            raise ValueError(
                f"pad_multiple={pad_multiple} differs from the dispatch's {handle.pad_multiple}"
            )
        combined, _ = _combine(x, handle)
        ctx.handle = handle
        return combined

    @staticmethod
    def backward(ctx, grad_output):
        grad_x = _cached_dispatch(grad_output.contiguous(), ctx.handle)
        return grad_x, None, None, None


def hybrid_ep_dispatch(
    x,
    routing_map,
    probs,
    group,
    num_local_experts,
    num_sms_dispatch_api=24,
    num_sms_combine_api=24,
    num_permuted_tokens=None,
    pad_multiple=None,
    scaling_factor=None,
):
    """Megatron's helper: HybridEPDispatch (its forward alone when nothing needs a gradient:
    _ops.apply). ``scaling_factor`` (an extension): the f32 scales [N, H/128] of a
    float8_e4m3fn ``x``, passed through to ``dispatched_scaling_factor``."""
    return _ops.apply(
        HybridEPDispatch,
        (x, probs),
        x,
        routing_map,
        probs,
        group,
        num_local_experts,
        num_sms_dispatch_api,
        num_sms_combine_api,
        num_permuted_tokens,
        pad_multiple,
        scaling_factor,
    )


def hybrid_ep_combine(x, handle, num_permuted_tokens=None, pad_multiple=None):
    """Megatron's helper: HybridEPCombine (its forward alone when nothing needs a gradient)."""
    return _ops.apply(HybridEPCombine, (x,), x, handle, num_permuted_tokens, pad_multiple)
