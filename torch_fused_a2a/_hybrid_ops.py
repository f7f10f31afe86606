"""torch.library custom ops of HybridEP mode (``torch.ops.fused_a2a.hybrid_*``), with fake kernels.

Each op looks its buffer up in the core's registry by (group_id, rank), passes ``data_ptr()``s and
the current CUDA stream, and allocates its outputs. Absent optional outputs are empty tensors (a
custom op cannot return None). The dynamic-size dispatch (``num_rows < 0``) sizes its outputs with
the permuted row count that the notify phase returns (on the host after its sync); its fake kernel
uses an unbacked size.
"""

from __future__ import annotations

import torch

import fused_a2a_core as core
from torch_fused_a2a._ops import _out, _ptr, _stream, dtype_code

META_SIZE = core.HYBRID_META_SIZE
META_TOTAL_ROWS = core.HYBRID_META_TOTAL_ROWS
META_OVERFLOW = core.HYBRID_META_OVERFLOW


def _counts(n: int, device: torch.device) -> torch.Tensor:
    return torch.empty(n, dtype=torch.int32, device=device)


def _e4m3() -> torch.dtype:
    return torch.float8_e4m3fn


def _hidden_dtype(x: torch.Tensor, quantize_fp8: bool) -> torch.dtype:
    return _e4m3() if quantize_fp8 else x.dtype


def _fp8_rows(x: torch.Tensor, quantize_fp8: bool) -> bool:
    return quantize_fp8 or x.dtype == _e4m3()


@torch.library.custom_op("fused_a2a::hybrid_dispatch", mutates_args=())
def hybrid_dispatch(
    x: torch.Tensor,
    x_scales: torch.Tensor | None,
    routing_map: torch.Tensor,
    probs: torch.Tensor | None,
    num_local_experts: int,
    pad_multiple: int,
    num_rows: int,
    quantize_fp8: bool,
    group_id: int,
    rank: int,
    num_ranks: int,
    num_sms: int,
) -> tuple[
    torch.Tensor,
    torch.Tensor,
    torch.Tensor,
    torch.Tensor,
    torch.Tensor,
    torch.Tensor,
    torch.Tensor,
    torch.Tensor,
]:
    """Dispatch with permute. Returns (hidden [P,H], probs [P] (or [0] without probs), scales
    [P,H/128] (or [P,0] without FP8), src_expert_counts [G*L] i32, row_token [P] i32,
    tokens_per_expert [L] i32, meta [4] i32, tokens_per_expert_host). num_rows < 0: P = the
    exact padded total (host sync after the notify phase), and tokens_per_expert_host is a CPU
    [L] i32 copy of tokens_per_expert filled by that phase (no wait for the data phase); else
    the static P and a CPU [0] tensor."""
    device = x.device
    num_tokens, hidden = x.shape
    args = core.HybridDispatchArgs()
    args.x, args.x_dtype, args.num_tokens, args.hidden = _ptr(x), dtype_code(x, "x"), *x.shape
    args.x_scales = _ptr(x_scales)
    args.routing_map, args.probs = _ptr(routing_map), _ptr(probs)
    args.num_experts, args.num_local_experts = routing_map.shape[1], num_local_experts
    args.pad_multiple, args.quantize_fp8, args.num_sms = pad_multiple, quantize_fp8, num_sms
    # Uninitialised: the notify phase writes every element before anything reads them (zeroing
    # them was three fill launches, ~25 us of the call's host time on GPUs; run 75's timeline).
    src_expert_counts = _counts(num_ranks * num_local_experts, device)
    tokens_per_expert = _counts(num_local_experts, device)
    meta = _counts(META_SIZE, device)
    args.src_expert_counts = src_expert_counts.data_ptr()
    args.tokens_per_expert = tokens_per_expert.data_ptr()
    args.meta = meta.data_ptr()
    stream = _stream(device)
    dynamic = num_rows < 0
    host_counts = torch.empty(num_local_experts if dynamic else 0, dtype=torch.int32)
    if dynamic:
        args.tokens_per_expert_host = host_counts.data_ptr()
        num_rows = core.hybrid_dispatch_notify(group_id, rank, stream, args)
    hidden_out = torch.empty(
        (num_rows, hidden), dtype=_hidden_dtype(x, quantize_fp8), device=device
    )
    probs_out = torch.empty(
        num_rows if probs is not None else 0, dtype=torch.float32, device=device
    )
    scale_cols = hidden // 128 if _fp8_rows(x, quantize_fp8) else 0
    scales_out = torch.empty((num_rows, scale_cols), dtype=torch.float32, device=device)
    # One spare element so that the pointer is valid even with P = 0.
    row_token = torch.empty(num_rows + 1, dtype=torch.int32, device=device)
    args.num_rows = num_rows
    args.permuted_x, args.permuted_probs = _out(hidden_out), _out(probs_out)
    args.permuted_scales = _out(scales_out)
    args.row_token = row_token.data_ptr()
    (core.hybrid_dispatch_data if dynamic else core.hybrid_dispatch)(group_id, rank, stream, args)
    return (
        hidden_out,
        probs_out,
        scales_out,
        src_expert_counts,
        row_token[:num_rows].clone(),
        tokens_per_expert,
        meta,
        host_counts,
    )


@hybrid_dispatch.register_fake
def _(
    x,
    x_scales,
    routing_map,
    probs,
    num_local_experts,
    pad_multiple,
    num_rows,
    quantize_fp8,
    group_id,
    rank,
    num_ranks,
    num_sms,
):
    host_counts = torch.empty(num_local_experts if num_rows < 0 else 0, dtype=torch.int32)
    if num_rows < 0:
        num_rows = torch.library.get_ctx().new_dynamic_size()
    hidden = x.shape[1]
    scale_cols = hidden // 128 if _fp8_rows(x, quantize_fp8) else 0
    new = x.new_empty
    return (
        new((num_rows, hidden), dtype=_hidden_dtype(x, quantize_fp8)),
        new((num_rows if probs is not None else 0,), dtype=torch.float32),
        new((num_rows, scale_cols), dtype=torch.float32),
        new((num_ranks * num_local_experts,), dtype=torch.int32),
        new((num_rows,), dtype=torch.int32),
        new((num_local_experts,), dtype=torch.int32),
        new((META_SIZE,), dtype=torch.int32),
        host_counts,
    )


@torch.library.custom_op("fused_a2a::hybrid_cached_dispatch", mutates_args=())
def hybrid_cached_dispatch(
    x: torch.Tensor,
    routing_map: torch.Tensor,
    src_expert_counts: torch.Tensor,
    row_token: torch.Tensor,
    meta: torch.Tensor,
    num_local_experts: int,
    pad_multiple: int,
    group_id: int,
    rank: int,
    num_sms: int,
) -> torch.Tensor:
    """Combine's backward: x [N,H] placed where the handle's dispatch placed the forward's rows;
    [P,H] out (P = rows of row_token), zeros on padding rows and the tail."""
    num_rows = row_token.shape[0]
    args = core.HybridDispatchArgs()
    args.x, args.x_dtype, args.num_tokens, args.hidden = _ptr(x), dtype_code(x, "x"), *x.shape
    args.routing_map = _ptr(routing_map)
    args.num_experts, args.num_local_experts = routing_map.shape[1], num_local_experts
    args.pad_multiple, args.num_sms = pad_multiple, num_sms
    args.src_expert_counts, args.meta = _ptr(src_expert_counts), _ptr(meta)
    out = torch.empty((num_rows, x.shape[1]), dtype=x.dtype, device=x.device)
    args.num_rows, args.permuted_x = num_rows, _out(out)
    core.hybrid_dispatch_cached(group_id, rank, _stream(x.device), args)
    return out


@hybrid_cached_dispatch.register_fake
def _(
    x,
    routing_map,
    src_expert_counts,
    row_token,
    meta,
    num_local_experts,
    pad_multiple,
    group_id,
    rank,
    num_sms,
):
    return x.new_empty((row_token.shape[0], x.shape[1]))


@torch.library.custom_op("fused_a2a::hybrid_combine", mutates_args=())
def hybrid_combine(
    y: torch.Tensor,
    probs: torch.Tensor | None,
    src_expert_counts: torch.Tensor,
    row_token: torch.Tensor,
    meta: torch.Tensor,
    num_local_experts: int,
    pad_multiple: int,
    num_tokens: int,
    group_id: int,
    rank: int,
    num_sms: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Combine with unpermute. Returns (out [N,H] y.dtype, combined_probs [N,E] f32, or [N,0]
    without probs)."""
    num_experts = src_expert_counts.shape[0]
    out = torch.empty((num_tokens, y.shape[1]), dtype=y.dtype, device=y.device)
    prob_cols = num_experts if probs is not None else 0
    out_probs = torch.empty((num_tokens, prob_cols), dtype=torch.float32, device=y.device)
    args = core.HybridCombineArgs()
    args.y, args.y_dtype, args.num_rows, args.hidden = _ptr(y), dtype_code(y, "x"), *y.shape
    args.probs = _ptr(probs)
    args.src_expert_counts, args.row_token = _ptr(src_expert_counts), _ptr(row_token)
    args.meta = _ptr(meta)
    args.num_local_experts, args.pad_multiple = num_local_experts, pad_multiple
    args.num_tokens, args.num_sms = num_tokens, num_sms
    args.out, args.out_probs = _out(out), _out(out_probs)
    core.hybrid_combine(group_id, rank, _stream(y.device), args)
    return out, out_probs


@hybrid_combine.register_fake
def _(
    y,
    probs,
    src_expert_counts,
    row_token,
    meta,
    num_local_experts,
    pad_multiple,
    num_tokens,
    group_id,
    rank,
    num_sms,
):
    prob_cols = src_expert_counts.shape[0] if probs is not None else 0
    return (
        y.new_empty((num_tokens, y.shape[1])),
        y.new_empty((num_tokens, prob_cols), dtype=torch.float32),
    )
