"""Drop-in for ``megatron.core.transformer.moe.fused_a2a`` / NeMo AutoModel's copy, normal mode.

Same names, argument order, defaults and return tuples as upstream (SEMANTICS.md section 1), on
fused_a2a's own kernels: CPU tensors over gloo groups, CUDA tensors over NCCL groups.
"""

from __future__ import annotations

import contextlib
from typing import NamedTuple

import torch
import torch.distributed as dist

import fused_a2a_core as core
from fused_a2a._common import PLATFORM_CUDA
from torch_fused_a2a import _ops
from torch_fused_a2a._buffers import Buffer, create_buffer, default_device

_buffer: Buffer | None = None
_num_sms: int = 24
_nvshmem_available: bool | None = None
_comm_streams: dict = {}


def _is_nvshmem_available() -> bool:
    """True only when an internode transport is compiled in and usable: none is yet."""
    global _nvshmem_available
    if _nvshmem_available is None:
        _nvshmem_available = bool(core.build_info().get("internode", False))
    return _nvshmem_available


def get_hidden_bytes(x: torch.Tensor) -> int:
    """Bytes of one row as the buffer sizes it (at least 2 bytes per value, as upstream)."""
    return x.size(1) * max(x.element_size(), 2)


def get_buffer(group, hidden_bytes: int, device: torch.device | None = None) -> Buffer:
    """The common buffer for ``group``; re-created when the group (or device) changes or more
    capacity is needed; never shrinks. Collective when it (re)creates."""
    global _buffer
    current = _buffer
    if (  # every call after the first: the same group, device and row size (~10 us saved)
        current is not None
        and current.group is group
        and hidden_bytes <= current.checked_hidden_bytes
        and (device is None or device == current.device)
        and not current.released
        and not current.poisoned()
    ):
        return current
    device = torch.device(device) if device is not None else None
    if device is None:
        device = current.device if current is not None and current.group is group else None
        device = device or default_device(group)
    platform = PLATFORM_CUDA if device.type == "cuda" else 0
    needed = core.recommended_buffer_bytes(hidden_bytes, dist.get_world_size(group), platform)
    if (
        current is None
        or current.released
        or current.group is not group
        or current.device != device
        or current.num_nvl_bytes < needed
        or current.poisoned()
    ):
        size = max(
            needed,
            current.num_nvl_bytes
            if current is not None and current.group is group and current.device == device
            else 0,
        )
        _buffer = create_buffer(group, size, device)
        if current is not None:
            current.release()
    _buffer.checked_hidden_bytes = max(_buffer.checked_hidden_bytes, hidden_bytes)
    return _buffer


def set_deepep_num_sms(num_sms: int) -> None:
    """SMs the communication kernels may use (even; at most the device's SM count)."""
    global _num_sms
    if not isinstance(num_sms, int) or num_sms <= 0 or num_sms % 2 != 0:
        raise ValueError(
            f"set_deepep_num_sms: num_sms must be a positive even integer, got {num_sms!r}"
        )
    if torch.cuda.is_available():
        sm_count = torch.cuda.get_device_properties(
            torch.cuda.current_device()
        ).multi_processor_count
        if num_sms > sm_count:
            raise ValueError(
                f"set_deepep_num_sms: num_sms={num_sms} exceeds the device's {sm_count} SMs"
            )
    _num_sms = num_sms


class DispatchHandle(NamedTuple):
    """What combine and a cached dispatch need (opaque to callers)."""

    topk_idx: torch.Tensor  # this rank's routing [N, K]
    recv_src_counts: torch.Tensor  # [G] int32 rows received from each rank
    recv_src_token: torch.Tensor  # [M] int32 source token of each received row
    stats: torch.Tensor  # [3] int32: num_recv, num_dropped, group_max_tokens
    num_experts: int
    num_tokens: int


_group_sizes: dict = {}  # group -> its size (the group is kept alive by its key)


def _group_size(group) -> int:
    """dist.get_world_size(group), once per group (~5 us a call on the GPU machine)."""
    size = _group_sizes.get(group)
    if size is None:
        size = _group_sizes[group] = dist.get_world_size(group)
    return size


def _check_flags(async_finish: bool, allocate_on_comm_stream: bool) -> None:
    if allocate_on_comm_stream and not async_finish:
        raise ValueError(
            "allocate_on_comm_stream=True is only valid with async_finish=True "
            f"(got async_finish={async_finish!r})"
        )


@contextlib.contextmanager
def _comm_stream(device: torch.device, async_finish: bool):
    """With async_finish on CUDA: run on the communication stream, ordered after the caller's
    stream, and make the caller's stream wait for it on exit (stream-ordered, as upstream)."""
    if not (async_finish and device.type == "cuda"):
        yield None
        return
    caller = torch.cuda.current_stream(device)
    comm = _comm_streams.setdefault(device.index, torch.cuda.Stream(device))
    comm.wait_stream(caller)
    with torch.cuda.stream(comm):
        yield comm
    caller.wait_stream(comm)


def _record(tensors, stream) -> None:
    if stream is None:
        return
    caller = torch.cuda.current_stream(stream.device)
    for t in tensors:
        if isinstance(t, torch.Tensor) and t.is_cuda:
            t.record_stream(caller)


def _check_2d(tensor, name: str, rows: int | None = None) -> None:
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if tensor.dim() != 2:
        raise ValueError(f"{name} must be 2-D, got shape {tuple(tensor.shape)}")
    if rows is not None and tensor.shape[0] != rows:
        raise ValueError(
            f"{name} must have {rows} rows (one per token), got shape {tuple(tensor.shape)}"
        )
    if not tensor.is_contiguous():
        raise ValueError(f"{name} must be contiguous, got strides {tensor.stride()}")


def _check_dispatch_inputs(x, token_indices, token_probs, num_experts, group) -> None:
    _check_2d(x, "x")
    _check_2d(token_indices, "token_indices", x.shape[0])
    if token_indices.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"token_indices must be int32 or int64, got {token_indices.dtype}")
    if token_probs is not None:
        _check_2d(token_probs, "token_probs", x.shape[0])
        if token_probs.shape != token_indices.shape:
            raise ValueError(
                f"token_probs shape {tuple(token_probs.shape)} must match token_indices shape "
                f"{tuple(token_indices.shape)}"
            )
        if token_probs.dtype != torch.float32:
            raise TypeError(f"token_probs must be float32, got {token_probs.dtype}")
    if not isinstance(num_experts, int) or num_experts <= 0:
        raise ValueError(f"num_experts must be a positive int, got {num_experts!r}")
    world = _group_size(group)
    if num_experts % world != 0:
        raise ValueError(
            f"num_experts ({num_experts}) must be a multiple of the group size ({world})"
        )
    if token_indices.device != x.device:
        raise ValueError(f"token_indices is on {token_indices.device}, x on {x.device}")


def _dispatch(x, topk_idx, topk_weights, num_experts, group):
    """The dynamic dispatch (exact row count, one host sync after the count exchange)."""
    buffer = get_buffer(group, get_hidden_bytes(x), x.device)
    out = _ops.run(
        _ops.dispatch,
        x,
        None,
        topk_idx,
        topk_weights,
        num_experts,
        buffer.group_id,
        buffer.rank,
        buffer.num_ranks,
        -1,
        _num_sms,
    )
    # tokens_per_expert: int64 on the CPU, from the count exchange (the op's 9th output)
    recv_x, _, recv_idx, recv_w, counts, src_token, _, stats, tokens_per_expert = out
    handle = DispatchHandle(topk_idx, counts, src_token, stats, num_experts, x.shape[0])
    return recv_x, recv_idx, recv_w, tokens_per_expert, handle  # recv_idx in topk_idx's dtype


def _combine(y, handle: DispatchHandle, group, weights=None, owner_only=False):
    buffer = get_buffer(group, get_hidden_bytes(y), y.device)
    return _ops.run(
        _ops.combine,
        y,
        weights,
        handle.topk_idx,
        handle.recv_src_counts,
        handle.recv_src_token,
        handle.stats,
        handle.num_experts,
        handle.num_tokens,
        owner_only,
        buffer.group_id,
        buffer.rank,
        _num_sms,
    )


def _cached_dispatch(x, handle: DispatchHandle, group):
    buffer = get_buffer(group, get_hidden_bytes(x), x.device)
    return _ops.run(
        _ops.cached_dispatch,
        x,
        handle.topk_idx,
        handle.recv_src_counts,
        handle.recv_src_token,
        handle.stats,
        handle.num_experts,
        buffer.group_id,
        buffer.rank,
        _num_sms,
    )


class FusedDispatch(torch.autograd.Function):
    """Dispatch tokens to the ranks that hold their experts (DeepEP normal mode)."""

    @staticmethod
    def forward(
        ctx,
        x,
        token_indices,
        token_probs,
        num_experts,
        group,
        async_finish=False,
        allocate_on_comm_stream=False,
    ):
        _check_flags(async_finish, allocate_on_comm_stream)
        _check_dispatch_inputs(x, token_indices, token_probs, num_experts, group)
        with _comm_stream(x.device, async_finish) as stream:
            recv_x, recv_idx, recv_probs, tokens_per_expert, handle = _dispatch(
                x, token_indices, token_probs, num_experts, group
            )
            _record((recv_x, recv_idx, recv_probs, *handle[:4]), stream)
        ctx.group, ctx.handle, ctx.async_finish = group, handle, async_finish
        if token_probs is None:
            recv_probs = None
        return recv_x, recv_idx, recv_probs, tokens_per_expert, handle

    @staticmethod
    def backward(
        ctx, grad_output, grad_token_indices, grad_token_probs, grad_tokens_per_expert, grad_handle
    ):
        handle = ctx.handle
        if grad_token_probs is None:
            grad_token_probs = torch.zeros(
                (grad_output.shape[0], handle.topk_idx.shape[1]),
                dtype=torch.float32,
                device=grad_output.device,
            )
        with _comm_stream(grad_output.device, ctx.async_finish) as stream:
            grad_x, grad_probs = _combine(
                grad_output.contiguous(),
                handle,
                ctx.group,
                grad_token_probs.float().contiguous(),
                owner_only=True,
            )
            _record((grad_x, grad_probs), stream)
        return grad_x, None, grad_probs, None, None, None, None


class FusedCombine(torch.autograd.Function):
    """Bring expert outputs back and sum them per token in a fixed order (DeepEP normal mode)."""

    @staticmethod
    def forward(ctx, x, group, handle, async_finish=False, allocate_on_comm_stream=False):
        _check_flags(async_finish, allocate_on_comm_stream)
        _check_2d(x, "x")
        if not isinstance(handle, DispatchHandle):
            raise TypeError(f"handle must come from fused_dispatch, got {type(handle).__name__}")
        with _comm_stream(x.device, async_finish) as stream:
            combined_x, _ = _combine(x, handle, group)
            _record((combined_x,), stream)
        ctx.group, ctx.handle, ctx.async_finish = group, handle, async_finish
        return combined_x, None

    @staticmethod
    def backward(ctx, grad_output, previous_event=None):
        with _comm_stream(grad_output.device, ctx.async_finish) as stream:
            grad_x = _cached_dispatch(grad_output.contiguous(), ctx.handle, ctx.group)
            _record((grad_x,), stream)
        return grad_x, None, None, None, None


def fused_dispatch(
    x,
    token_indices,
    token_probs,
    num_experts,
    group,
    async_finish=False,
    allocate_on_comm_stream=False,
):
    """Megatron's helper: FusedDispatch on a contiguous x (its forward alone when nothing needs a
    gradient: _ops.apply)."""
    return _ops.apply(
        FusedDispatch,
        (x, token_probs),
        x.contiguous(),
        token_indices,
        token_probs,
        num_experts,
        group,
        async_finish,
        allocate_on_comm_stream,
    )


def fused_combine(x, group, handle, async_finish=False, allocate_on_comm_stream=False):
    """Megatron's helper: FusedCombine (its forward alone when nothing needs a gradient)."""
    return _ops.apply(FusedCombine, (x,), x, group, handle, async_finish, allocate_on_comm_stream)
