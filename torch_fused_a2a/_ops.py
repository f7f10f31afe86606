"""torch.library custom ops over the core (``torch.ops.fused_a2a.*``), with fake kernels.

Each op looks its buffer up in the core's registry by (group_id, rank), passes ``data_ptr()``s and
the current CUDA stream, and allocates its outputs. Shapes that depend on routing (the dynamic
dispatch) use an unbacked size in the fake kernel.
"""

from __future__ import annotations

import itertools
import os

import numpy as np
import torch

import fused_a2a_core as core
from fused_a2a._common import (
    DTYPE_BF16,
    DTYPE_E4M3,
    DTYPE_F16,
    DTYPE_F32,
    DTYPE_I32,
    DTYPE_I64,
)
from torch_fused_a2a import _arena

_DTYPE_CODES = {
    torch.float32: DTYPE_F32,
    torch.float16: DTYPE_F16,
    torch.bfloat16: DTYPE_BF16,
    torch.int32: DTYPE_I32,
    torch.int64: DTYPE_I64,
}
if hasattr(torch, "float8_e4m3fn"):
    _DTYPE_CODES[torch.float8_e4m3fn] = DTYPE_E4M3


def dtype_code(tensor: torch.Tensor, name: str) -> int:
    try:
        return _DTYPE_CODES[tensor.dtype]
    except KeyError:
        raise TypeError(f"{name} has unsupported dtype {tensor.dtype}") from None


# The current stream's cudaStream_t (the arena's lookup, one call on CUDA builds of torch)
_stream = _arena.stream_handle


_placeholders: dict = {}


def _ptr(tensor: torch.Tensor | None) -> int:
    """data_ptr(), with a non-null placeholder for a present but empty tensor: the core reads
    presence from the pointer, and presence must agree across ranks (ops.h)."""
    if tensor is None:
        return 0
    if tensor.numel() == 0:
        key = (tensor.device.type, tensor.device.index)
        if key not in _placeholders:
            _placeholders[key] = torch.zeros(16, dtype=torch.uint8, device=tensor.device)
        return _placeholders[key].data_ptr()
    return tensor.data_ptr()


def _out(tensor: torch.Tensor) -> int:
    """Output pointer: null when there is nothing to write."""
    return tensor.data_ptr() if tensor.numel() > 0 else 0


# Calls per route (run), for tests: "direct" ran an op's body, "op" went through torch.library.
ROUTE_COUNTS = {"direct": 0, "op": 0}


def _direct(args) -> bool:
    """Whether an eager call may run a custom op's body directly. Only in plain eager mode: not
    compiling or exporting, no dispatch mode (fake, proxy, functionalization ...), plain tensors
    (no subclass, no functorch wrapper), and no input that autograd would need to see.
    FUSED_A2A_TORCH_DIRECT=0 sends every call through the op."""
    if os.environ.get("FUSED_A2A_TORCH_DIRECT", "1") == "0" or torch.compiler.is_compiling():
        return False
    if torch._C._len_torch_dispatch_stack() > 0:
        return False
    grad = torch.is_grad_enabled()
    wrapped = torch._C._functorch.is_functorch_wrapped_tensor
    for arg in args:
        if isinstance(arg, torch.Tensor):
            if type(arg) is not torch.Tensor or wrapped(arg) or (grad and arg.requires_grad):
                return False
    return True


class _PlainContext:
    """What an autograd Function's forward gets as its context when it runs without the
    Function (apply): a namespace for the attributes it keeps, and no-op marks."""

    def mark_non_differentiable(self, *tensors):
        pass


def apply(function, grad_inputs: tuple, *args):
    """function.apply(*args) (a Megatron helper's autograd Function) when grad mode is on and a
    tensor of grad_inputs requires grad, or one is a functorch wrapper (its transforms see the
    Function), or torch.compile is tracing (it sees what it saw before session 22); else
    function.forward alone: the same outputs, none requiring grad, without Function.apply's
    cost (one CPU rank: 6-14 us a call, benchmarks/helper_overhead.py) that an inference or
    decode step does not need."""
    if torch.compiler.is_compiling():
        return function.apply(*args)
    wrapped = torch._C._functorch.is_functorch_wrapped_tensor
    grad = torch.is_grad_enabled()
    for t in grad_inputs:
        if isinstance(t, torch.Tensor) and ((grad and t.requires_grad) or wrapped(t)):
            return function.apply(*args)
    return function.forward(_PlainContext(), *args)


def run(op, *args):
    """Call custom op `op` (a CustomOpDef of this package) on positional args.

    In plain eager mode (_direct) the op's body runs directly. torch.library's layer (dispatcher,
    autograd fallthrough, dynamo guard, aliasing check) costs 50-60 us a call on the GPU machine
    (session 8, run 37: a static dispatch took 147 us with it and 86 without, a combine 77 and 27).
    That is as much as a small dispatch's GPU time. The body is the same function either way, so
    the results are the same bits. Tracing, compiling and fake tensors still see the op.
    """
    if _direct(args):
        ROUTE_COUNTS["direct"] += 1
        return op._init_fn(*args)
    ROUTE_COUNTS["op"] += 1
    return op(*args)


def _recv_idx_dtype(topk_idx: torch.Tensor) -> torch.dtype:
    """recv_topk_idx's dtype: topk_idx's (int64 or int32, as Megatron returns the indices; the
    kernels write int64 directly, no conversion kernel after the dispatch)."""
    return torch.int64 if topk_idx.dtype == torch.int64 else torch.int32


def _i32(n: int, device: torch.device) -> torch.Tensor:
    return torch.zeros(n, dtype=torch.int32, device=device)


@torch.library.custom_op("fused_a2a::dispatch", mutates_args=())
def dispatch(
    x: torch.Tensor,
    x_scales: torch.Tensor | None,
    topk_idx: torch.Tensor,
    topk_weights: torch.Tensor | None,
    num_experts: int,
    group_id: int,
    rank: int,
    num_ranks: int,
    capacity: int,
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
    torch.Tensor,
]:
    """Returns (recv_x, recv_x_scales, recv_topk_idx [in topk_idx's dtype: int64 or int32],
    recv_topk_weights, recv_src_counts, recv_src_token, tokens_per_expert, stats = [num_recv,
    num_dropped, group_max_tokens], tokens_per_expert_host). capacity < 0: exactly the received
    rows, found by one host wait for the count exchange, which also brings
    tokens_per_expert_host ([L] int64 on the CPU, as
    Megatron's fused_dispatch returns it; no row is dropped then, so it equals tokens_per_expert);
    the data phase may start before that wait (_dispatch_body); else a static row count, no
    sync, and an empty tokens_per_expert_host."""
    op_args = (x, x_scales, topk_idx, topk_weights, num_experts, group_id, rank, num_ranks)
    return _dispatch_body(op_args, capacity, num_sms, speculate=True)


# The dynamic dispatch queues its data kernel right behind the count exchange, without waiting
# for the counts on the host in between (the GPU would idle while the host wakes up, sizes the
# outputs and launches: 80-140 us a call in runs 56-57), once the group's largest N is known
# from an earlier dynamic dispatch on the buffer: then no source can send more than that many
# rows, so outputs of num_ranks x that many rows hold every received row, and they are shrunk
# (resize_, same storage) to num_recv rows when the counts arrive. Should a source have more
# tokens than seen before (the same verdict on every rank: group_max_tokens and this history
# are group-wide), every rank runs the exact path again. FUSED_A2A_TORCH_SPECULATIVE_MB bounds
# the outputs' size (default 2048; 0: always the exact path).
_group_max_seen: dict[int, int] = {}
_tickets = itertools.count(1)
# Dynamic dispatches per path, for tests: "exact" (host wait before the data phase; a redo
# included), "speculative" (data phase queued before the wait), "redo" (a speculative one whose
# group had more tokens than seen before, run again exactly), "one_kernel" (a speculative one
# through the static kernel, _speculative_static).
DYNAMIC_PATHS = {"exact": 0, "speculative": 0, "redo": 0, "one_kernel": 0}


# The count exchange's group size limit of the static kernel's layout notify (kLayoutMaxRanks).
_STATIC_SPECULATIVE_MAX_RANKS = 8
_SPECULATIVE_MODES = ("static", "two_kernels")


def _speculative_static(num_ranks: int, fp8: bool) -> bool:
    """Whether the speculative path runs the static dispatch kernel, whose count exchange is
    inside it and which writes the host counts and the ticket itself, instead of
    dispatch_notify's kernel and then the data kernel: one launch and one exchange fewer, -12.6
    to -16.5 us at EP 4 (24 and 48 SMs) and EP 2 in run 87 (4x H100). The default for G <= 8;
    FUSED_A2A_TORCH_SPECULATIVE=two_kernels (set alike on every rank) keeps the two kernels, as
    does FUSED_A2A_CUDA_LAYOUT=ready (the static kernel's exchange is its layout notify). FP8
    rows keep them where they want the metadata records kernel, which this path runs without
    (run 117: 45-112 us lost through the static kernel when FP8 rows used records): with
    FUSED_A2A_CUDA_RECORDS=1, or FUSED_A2A_CUDA_RECV_PUSH=0 (records_env in
    csrc/kernels/cuda/state.cu). Since session 26 the static FP8 dispatch pushes from its
    receivers without records; session 29 (run 163, EP 4, 24 SMs) timed the two kernels'
    notify at 56.5 us before a 347-us data kernel, against 304 us for the static dispatch."""
    mode = os.environ.get("FUSED_A2A_TORCH_SPECULATIVE", "static")
    if mode not in _SPECULATIVE_MODES:
        raise ValueError(
            f"FUSED_A2A_TORCH_SPECULATIVE must be one of {_SPECULATIVE_MODES}, got {mode!r}"
        )
    fp8_records = fp8 and (
        os.environ.get("FUSED_A2A_CUDA_RECORDS", "-1").strip() not in ("-1", "0", "")
        or os.environ.get("FUSED_A2A_CUDA_RECV_PUSH", "4").strip() == "0"
    )
    return (
        mode == "static"
        and num_ranks <= _STATIC_SPECULATIVE_MAX_RANKS
        and not fp8_records
        and os.environ.get("FUSED_A2A_CUDA_LAYOUT") != "ready"
    )


def _speculative_rows(seen: int, num_ranks: int, num_tokens: int, row_bytes: int) -> int:
    """Rows of the speculative outputs, or 0 for the exact path (a group-uniform decision: seen,
    the group's largest N so far, is the same on every rank)."""
    limit = int(os.environ.get("FUSED_A2A_TORCH_SPECULATIVE_MB", "2048")) << 20
    if seen <= 0 or num_ranks * seen * row_bytes > limit:
        return 0
    return num_ranks * max(seen, num_tokens)


def _read_host_counts(head: torch.Tensor, group_id: int, seen: int, num_local: int):
    """(num_recv, group_max_tokens, tokens_per_expert as int64) from the count exchange's host
    counts; the group's largest N so far is updated from them."""
    # through NumPy: Tensor.tolist and Tensor.to took ~30 us of run 119's traced host path
    words = head.numpy()
    num_recv, group_max = int(words[0]), int(words[2])
    _group_max_seen[group_id] = max(seen, group_max)
    return num_recv, group_max, torch.from_numpy(words[3 : 3 + num_local].astype(np.int64))


def _dispatch_body(op_args: tuple, capacity: int, num_sms: int, speculate: bool):
    """The dispatch op's body; op_args = its arguments up to num_ranks."""
    x, x_scales, topk_idx, topk_weights, num_experts, group_id, rank, num_ranks = op_args
    device = x.device
    num_tokens, hidden = x.shape
    num_topk = topk_idx.shape[1]
    num_local = num_experts // num_ranks
    args = core.DispatchArgs()
    args.x, args.x_dtype, args.num_tokens, args.hidden = _ptr(x), dtype_code(x, "x"), *x.shape
    args.x_scales = _ptr(x_scales)
    args.topk_idx, args.idx_dtype = _ptr(topk_idx), dtype_code(topk_idx, "topk_idx")
    args.num_topk, args.num_experts, args.num_sms = num_topk, num_experts, num_sms
    args.topk_weights = _ptr(topk_weights)
    # The CUDA kernels write every element of these (the data kernel's epilogue, or the count
    # exchange), so no fill kernels run before them (three launches, ~1 us each on the critical
    # path, run 51's kernel times); the CPU backend accumulates into tokens_per_expert.
    counts = torch.empty if device.type == "cuda" else torch.zeros
    recv_src_counts = counts(num_ranks, dtype=torch.int32, device=device)
    tokens_per_expert = counts(num_local, dtype=torch.int32, device=device)
    stats = counts(3, dtype=torch.int32, device=device)
    args.recv_src_counts, args.tokens_per_expert = _ptr(recv_src_counts), _ptr(tokens_per_expert)
    args.num_recv = stats.data_ptr()
    args.num_dropped = stats.data_ptr() + 4
    args.group_max_tokens = stats.data_ptr() + 8
    stream = _stream(device)
    dynamic = capacity < 0
    counts_host = torch.empty(0, dtype=torch.int64)
    ticket = 0
    one_kernel = False  # the speculative path through the static kernel
    if dynamic:
        # The count exchange writes num_recv, num_dropped, group_max_tokens and tokens_per_expert
        # (then the ticket) into host memory too (pinned on GPUs: the kernel writes it), so no
        # copy back follows its wait.
        pinned = device.type == "cuda"
        head = torch.empty(4 + num_local, dtype=torch.int32, pin_memory=pinned)
        args.host_counts = head.data_ptr()
        seen = _group_max_seen.get(group_id, 0)
        row_bytes = hidden * x.element_size()
        capacity = _speculative_rows(seen, num_ranks, num_tokens, row_bytes) if speculate else 0
        DYNAMIC_PATHS["speculative" if capacity else "exact"] += 1
        if capacity:
            ticket = next(_tickets) % 0x7FFFFFFF + 1
            args.host_ticket, args.zero_padding = ticket, False
            # the data kernel's capacity, published by the exchange with
            # FUSED_A2A_CUDA_LAYOUT=dynamic (0: the exact size, nothing dropped)
            args.next_capacity = capacity
            one_kernel = _speculative_static(num_ranks, x_scales is not None)
            DYNAMIC_PATHS["one_kernel"] += one_kernel
        if not one_kernel:
            core.dispatch_notify(group_id, rank, stream, args)
        if not ticket:
            capacity, _, counts_host = _read_host_counts(head, group_id, seen, num_local)
    # In the buffer's output arena when it has one (FUSED_A2A_TORCH_ARENA_MB): the static
    # kernel's senders then write the rows straight into it (direct rows)
    recv_x = _arena.empty(group_id, (capacity, hidden), x.dtype, device, stream)
    scale_cols = hidden // 128 if x_scales is not None else 0
    recv_x_scales = torch.empty((capacity, scale_cols), dtype=torch.float32, device=device)
    recv_topk_idx = torch.empty(
        (capacity, num_topk), dtype=_recv_idx_dtype(topk_idx), device=device
    )
    weight_cols = num_topk if topk_weights is not None else 0
    recv_topk_weights = torch.empty((capacity, weight_cols), dtype=torch.float32, device=device)
    recv_src_token = torch.empty(capacity, dtype=torch.int32, device=device)
    args.capacity = capacity
    args.recv_x, args.recv_x_scales = _out(recv_x), _out(recv_x_scales)
    if recv_topk_idx.dtype == torch.int64:
        args.recv_topk_idx64 = _out(recv_topk_idx)
    else:
        args.recv_topk_idx = _out(recv_topk_idx)
    args.recv_topk_weights = _out(recv_topk_weights)
    args.recv_src_token = _ptr(recv_src_token)  # a placeholder when empty: present, not written
    phase = core.dispatch_data if dynamic and not one_kernel else core.dispatch
    phase(group_id, rank, stream, args)
    if ticket:
        core.dispatch_notify_wait(group_id, rank, head.data_ptr(), num_local, ticket)
        num_recv, group_max, counts_host = _read_host_counts(head, group_id, seen, num_local)
        if group_max > seen:  # a source may have overflowed the outputs: the exact path
            DYNAMIC_PATHS["redo"] += 1
            return _dispatch_body(op_args, -1, num_sms, speculate=False)
        for out in (recv_x, recv_x_scales, recv_topk_idx, recv_topk_weights):
            out.resize_(num_recv, out.shape[1])
        recv_src_token.resize_(num_recv)
    return (
        recv_x,
        recv_x_scales,
        recv_topk_idx,
        recv_topk_weights,
        recv_src_counts,
        recv_src_token,
        tokens_per_expert,
        stats,
        counts_host,
    )


@dispatch.register_fake
def _(
    x, x_scales, topk_idx, topk_weights, num_experts, group_id, rank, num_ranks, capacity, num_sms
):
    dynamic = capacity < 0
    if dynamic:
        capacity = torch.library.get_ctx().new_dynamic_size()
    hidden, num_topk = x.shape[1], topk_idx.shape[1]
    scale_cols = hidden // 128 if x_scales is not None else 0
    weight_cols = num_topk if topk_weights is not None else 0
    new = x.new_empty
    return (
        new((capacity, hidden)),
        new((capacity, scale_cols), dtype=torch.float32),
        new((capacity, num_topk), dtype=_recv_idx_dtype(topk_idx)),
        new((capacity, weight_cols), dtype=torch.float32),
        new((num_ranks,), dtype=torch.int32),
        new((capacity,), dtype=torch.int32),
        new((num_experts // num_ranks,), dtype=torch.int32),
        new((3,), dtype=torch.int32),
        torch.empty((num_experts // num_ranks if dynamic else 0,), dtype=torch.int64, device="cpu"),
    )


@torch.library.custom_op("fused_a2a::cached_dispatch", mutates_args=())
def cached_dispatch(
    x: torch.Tensor,
    topk_idx: torch.Tensor,
    recv_src_counts: torch.Tensor,
    recv_src_token: torch.Tensor,
    stats: torch.Tensor,
    num_experts: int,
    group_id: int,
    rank: int,
    num_sms: int,
) -> torch.Tensor:
    """Combine's backward: x [N,H] sent where the handle's dispatch sent it; [C,H] out."""
    capacity = recv_src_token.shape[0]
    args = core.DispatchArgs()
    args.x, args.x_dtype, args.num_tokens, args.hidden = _ptr(x), dtype_code(x, "x"), *x.shape
    args.topk_idx, args.idx_dtype = _ptr(topk_idx), dtype_code(topk_idx, "topk_idx")
    args.num_topk, args.num_experts, args.num_sms = topk_idx.shape[1], num_experts, num_sms
    # in the output arena when there is one (direct rows by the ready message), unless
    # FUSED_A2A_TORCH_ARENA_CACHED=0 (session 20's A/B: run 105 lost 47 us here with the arena)
    in_arena = os.environ.get("FUSED_A2A_TORCH_ARENA_CACHED", "1") != "0"
    shape = (capacity, x.shape[1])
    stream = _stream(x.device)
    if in_arena:
        recv_x = _arena.empty(group_id, shape, x.dtype, x.device, stream)
    else:
        recv_x = torch.empty(shape, dtype=x.dtype, device=x.device)
    counts = recv_src_counts.clone()  # rewritten by the core; the handle stays as it is
    token_scratch = torch.empty(capacity + 1, dtype=torch.int32, device=x.device)
    group_max = stats[2:3].clone()
    # num_recv, num_dropped and tokens_per_expert, which the CUDA op recounts (core cached_dispatch)
    num_local = num_experts // recv_src_counts.shape[0]
    scratch = torch.empty(2 + num_local, dtype=torch.int32, device=x.device)
    args.capacity, args.recv_x = capacity, _out(recv_x)
    args.recv_src_counts, args.recv_src_token = counts.data_ptr(), token_scratch.data_ptr()
    args.group_max_tokens = group_max.data_ptr()
    args.num_recv, args.num_dropped = scratch.data_ptr(), scratch.data_ptr() + 4
    args.tokens_per_expert = scratch.data_ptr() + 8
    core.cached_dispatch(group_id, rank, stream, args)
    return recv_x


@cached_dispatch.register_fake
def _(x, topk_idx, recv_src_counts, recv_src_token, stats, num_experts, group_id, rank, num_sms):
    return x.new_empty((recv_src_token.shape[0], x.shape[1]))


@torch.library.custom_op("fused_a2a::combine", mutates_args=())
def combine(
    y: torch.Tensor,
    weights: torch.Tensor | None,
    topk_idx: torch.Tensor,
    recv_src_counts: torch.Tensor,
    recv_src_token: torch.Tensor,
    stats: torch.Tensor,
    num_experts: int,
    num_tokens: int,
    weights_owner_only: bool,
    group_id: int,
    rank: int,
    num_sms: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (out [N,H] y.dtype, out_weights [N,K] f32, or [N,0] without weights)."""
    num_topk = topk_idx.shape[1]
    out = torch.empty((num_tokens, y.shape[1]), dtype=y.dtype, device=y.device)
    weight_cols = num_topk if weights is not None else 0
    out_weights = torch.empty((num_tokens, weight_cols), dtype=torch.float32, device=y.device)
    args = core.CombineArgs()
    args.y, args.y_dtype, args.num_rows, args.hidden = _ptr(y), dtype_code(y, "x"), *y.shape
    args.weights, args.num_topk = _ptr(weights), num_topk
    args.weights_owner_only = weights_owner_only
    args.recv_src_counts, args.recv_src_token = _ptr(recv_src_counts), _ptr(recv_src_token)
    args.group_max_tokens = stats.data_ptr() + 8
    args.topk_idx, args.idx_dtype = _ptr(topk_idx), dtype_code(topk_idx, "topk_idx")
    args.num_experts, args.num_tokens, args.num_sms = num_experts, num_tokens, num_sms
    args.out, args.out_weights = _out(out), _out(out_weights)
    core.combine(group_id, rank, _stream(y.device), args)
    return out, out_weights


@combine.register_fake
def _(
    y,
    weights,
    topk_idx,
    recv_src_counts,
    recv_src_token,
    stats,
    num_experts,
    num_tokens,
    weights_owner_only,
    group_id,
    rank,
    num_sms,
):
    weight_cols = topk_idx.shape[1] if weights is not None else 0
    return (
        y.new_empty((num_tokens, y.shape[1])),
        y.new_empty((num_tokens, weight_cols), dtype=torch.float32),
    )


@torch.library.custom_op("fused_a2a::layout", mutates_args=())
def layout(
    topk_idx: torch.Tensor, num_experts: int, num_ranks: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(num_tokens_per_rank [G] i32, num_tokens_per_expert [E] i32, is_token_in_rank [N,G] bool)."""
    device = topk_idx.device
    per_rank = _i32(num_ranks, device)
    per_expert = _i32(num_experts, device)
    in_rank = torch.empty((topk_idx.shape[0], num_ranks), dtype=torch.bool, device=device)
    platform = 1 if device.type == "cuda" else 0
    core.layout(
        platform,
        _stream(device),
        _ptr(topk_idx),
        dtype_code(topk_idx, "topk_idx"),
        topk_idx.shape[0],
        topk_idx.shape[1],
        num_experts,
        num_ranks,
        _out(per_rank),
        _out(per_expert),
        _out(in_rank),
    )
    return per_rank, per_expert, in_rank


@layout.register_fake
def _(topk_idx, num_experts, num_ranks):
    new = topk_idx.new_empty
    return (
        new((num_ranks,), dtype=torch.int32),
        new((num_experts,), dtype=torch.int32),
        new((topk_idx.shape[0], num_ranks), dtype=torch.bool),
    )
