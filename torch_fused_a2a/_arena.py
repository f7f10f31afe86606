"""Torch's output arena: the dispatch's recv_x inside the communication buffer (CUDA default).

The static dispatch's senders write rows straight into a receiver's recv_x when every peer can
reach it ("direct rows", csrc/kernels/cuda/dispatch.cu): 16 us less at EP 4, N = 4096 for JAX,
whose devices share one process (docs/DECISIONS.md). Torch's ranks are processes: they map each
other's communication buffers (CUDA IPC) but not each other's torch allocations. With
``FUSED_A2A_TORCH_ARENA_MB`` > 0 a normal-mode buffer gets an output arena of that size after its
data region (every peer maps it with the rest), and the dispatch takes recv_x from it when it
fits, else from torch (its rows then go through the receive window, as without an arena). The
default on CUDA is 2048 MB (session 21: the dispatch and the combine's backward 16 us faster at
EP 4, N = 4096, 48 SMs; 0 turns it off); CPU buffers have none unless asked.

Two allocators share the semantics below: the core's (CoreArena, the default: the free list in C++,
each block a DLPack capsule whose deleter returns it when torch frees the storage) and this
file's Python one (RowArena, FUSED_A2A_TORCH_ARENA_ALLOC=python).

A block is a tensor over arena memory; it returns to the arena when the tensor dies. Like torch's
caching allocator, a freed block is reusable at once by work on the stream it was allocated on
(stream order puts the new work after every use there); an allocation on another stream first
waits for that stream (wait_stream), and in the core's arena for every stream recorded with
torch's record_stream (hooked: torch's own does nothing for memory it did not allocate). Other
uses on other streams are the caller's to order, as with torch's allocator. No CUDA call runs at
a free. The core's allocation takes 12-17 us of host time in the rank processes (run 111), the
Python one 39-70 us, which made ops host-bound in session 20 (docs/DECISIONS.md). A block keeps
the core buffer (and so the arena's memory) alive, also past the buffer's release.

While a CUDA graph is being captured, the core's arena hands out memory that it keeps for that
capture (its freed blocks serve its later ones on the same stream, else memory no block has had,
from the top) and never takes back (the graph replays into it for as long as it lives), so a
captured static dispatch keeps its direct rows; the Python allocator stays out of captures.
"""

from __future__ import annotations

import collections
import math
import os
import threading
import time
import warnings

import numpy as np
import torch

import fused_a2a_core as core

ALIGN = 512  # bytes: every block starts 16-byte aligned (the kernels' 16-byte row accesses)
_arenas: dict[int, RowArena | CoreArena] = {}
# benchmarks/arena_probe.py sets STEP_US = {} to collect each allocation's host time per step
STEPS = ("free list", "stream order", "tensor from the block", "typed tensor")  # RowArena
CORE_STEPS = ("current stream", "core block", "from_dlpack")  # CoreArena
STEP_US: dict | None = None
_lock = threading.Lock()


DEFAULT_CUDA_MB = 2048  # session 21: with 1024 the combine's backward did not gain (run 114)


def arena_bytes_env(cuda: bool = False) -> int:
    """FUSED_A2A_TORCH_ARENA_MB as bytes (a multiple of 64); default DEFAULT_CUDA_MB for a CUDA
    buffer (direct rows: session 21's runs), 0 (no arena) elsewhere: CPU ranks copy through the
    window either way."""
    text = os.environ.get("FUSED_A2A_TORCH_ARENA_MB", str(DEFAULT_CUDA_MB if cuda else 0))
    try:
        mb = float(text)
    except ValueError:
        mb = -1.0
    if mb < 0:
        raise ValueError(f"FUSED_A2A_TORCH_ARENA_MB must be a number of MB >= 0, got {text!r}")
    return int(mb * (1 << 20)) // 64 * 64


def arena_is_default() -> bool:
    """True when FUSED_A2A_TORCH_ARENA_MB is unset (the size is the package's choice)."""
    return "FUSED_A2A_TORCH_ARENA_MB" not in os.environ


def _own_tensor(raw: torch.Tensor, dtype: torch.dtype, shape: tuple) -> torch.Tensor:
    """A tensor of ``dtype`` and ``shape`` of its own over raw's storage, not a view (the custom
    ops' outputs)."""
    return torch.empty(0, dtype=dtype, device=raw.device).set_(raw.untyped_storage(), 0, shape)


def _record_steps(names: tuple, stamps: tuple) -> None:
    """STEP_US[name] gets each step's microseconds (the differences of the perf_counter stamps)."""
    for name, start, end in zip(names, stamps[:-1], stamps[1:], strict=True):
        STEP_US.setdefault(name, []).append((end - start) * 1e6)


class FreeList:
    """First-fit intervals of [0, size): alloc returns (offset, bytes taken, the streams of the
    memory's last uses) or None; free takes the block's streams as {key: stream}. A merge keeps
    both sides' streams (a few: one per stream that allocated here)."""

    def __init__(self, size: int):
        self.size = size
        self.free_spans: list[list] = [[0, size, {}]] if size > 0 else []  # [start, end, streams]

    def alloc(self, nbytes: int):
        need = max(ALIGN, (nbytes + ALIGN - 1) // ALIGN * ALIGN)
        for i, (start, end, streams) in enumerate(self.free_spans):
            if end - start >= need:
                if end - start == need:
                    del self.free_spans[i]
                else:
                    self.free_spans[i] = [start + need, end, dict(streams)]
                return start, need, list(streams.values())
        return None

    def free(self, start: int, nbytes: int, streams: dict) -> None:
        end = start + nbytes
        i = 0
        while i < len(self.free_spans) and self.free_spans[i][0] < start:
            i += 1
        span = [start, end, dict(streams)]
        self.free_spans.insert(i, span)
        if i + 1 < len(self.free_spans) and self.free_spans[i + 1][0] == end:
            nxt = self.free_spans.pop(i + 1)
            span[1] = nxt[1]
            span[2].update(nxt[2])
        if i > 0 and self.free_spans[i - 1][1] == start:
            prev = self.free_spans.pop(i - 1)
            span[0] = prev[0]
            span[2].update(prev[2])

    def free_bytes(self) -> int:
        return sum(end - start for start, end, _ in self.free_spans)


class _Block:
    """Arena memory [address, address + nbytes) seen as a uint8 array; back to the arena on
    deletion (when the last tensor over it dies)."""

    def __init__(self, arena: RowArena, offset: int, nbytes: int, stream):
        self.arena, self.offset, self.nbytes, self.stream = arena, offset, nbytes, stream
        address = arena.address + offset
        interface = {"shape": (nbytes,), "typestr": "|u1", "data": (address, False), "version": 3}
        if arena.device.type == "cuda":  # no "stream" entry: the consumer syncs nothing
            self.__cuda_array_interface__ = interface
        else:
            self.__array_interface__ = interface

    def __del__(self):
        streams = {} if self.stream is None else {self.stream.cuda_stream: self.stream}
        self.arena.pending.append((self.offset, self.nbytes, streams))


class RowArena:
    """This rank's output arena of one core buffer."""

    def __init__(self, group_id: int, rank: int, device: torch.device):
        self.address, self.size = core.buffer_arena(group_id, rank)
        self.counts = {"arena": 0, "no_room": 0}  # kept by empty()
        self.keep = core.buffer_ref(group_id, rank)  # the memory lives while a block does
        self.device = device
        self.spans = FreeList(self.size)
        self.lock = threading.Lock()
        # Freed blocks wait here (a deque's append needs no lock) until the next allocation takes
        # the lock: a tensor may die inside an allocation (a garbage-collection pass), whose span
        # walk must not change under it.
        self.pending = collections.deque()

    def tensor(self, shape: tuple, dtype: torch.dtype, stream: int | None = None):
        """An uninitialised tensor of ``shape`` in the arena, or None when it does not fit
        (always for work on the device's current stream: ``stream`` is CoreArena's)."""
        nbytes = math.prod(shape) * dtype.itemsize
        if nbytes == 0:
            return None
        t0 = time.perf_counter() if STEP_US is not None else 0.0
        with self.lock:
            self._take_pending()
            got = self.spans.alloc(nbytes)
        if got is None:
            return None
        offset, taken, streams = got
        t1 = time.perf_counter() if STEP_US is not None else 0.0
        stream = None
        if self.device.type == "cuda":
            stream = torch.cuda.current_stream(self.device)
            for last in streams:  # the memory's last uses on other streams come first
                if last.cuda_stream != stream.cuda_stream:
                    stream.wait_stream(last)
        t2 = time.perf_counter() if STEP_US is not None else 0.0
        block = _Block(self, offset, taken, stream)
        if self.device.type == "cuda":
            raw = torch.as_tensor(block, device=self.device)
        else:
            raw = torch.from_numpy(np.asarray(block))
        t3 = time.perf_counter() if STEP_US is not None else 0.0
        out = _own_tensor(raw, dtype, shape)
        if STEP_US is not None:
            _record_steps(STEPS, (t0, t1, t2, t3, time.perf_counter()))
        return out

    def _take_pending(self) -> None:  # under self.lock
        while self.pending:
            self.spans.free(*self.pending.popleft())

    def free_bytes(self) -> int:
        with self.lock:
            self._take_pending()
            return self.spans.free_bytes()


# Torch dtypes as DLPack (type code, bits); others (FP8) take a uint8 block, retyped
_DLPACK_DTYPES = {
    torch.bfloat16: (4, 16),
    torch.float16: (2, 16),
    torch.float32: (2, 32),
    torch.uint8: (1, 8),
    torch.int8: (0, 8),
    torch.int32: (0, 32),
}


class CoreArena:
    """This rank's output arena, its free list in the core (csrc/core/arena.cc): a block is a
    DLPack capsule that torch.from_dlpack takes, and it returns to the arena in C++ when torch
    frees the tensor's storage (the default; FUSED_A2A_TORCH_ARENA_ALLOC=python: RowArena)."""

    def __init__(self, group_id: int, rank: int, device: torch.device):
        self.group_id, self.rank, self.device = group_id, rank, device
        self.address, self.size = core.buffer_arena(group_id, rank)
        self.counts = {"arena": 0, "no_room": 0}  # kept by empty()

    def tensor(self, shape: tuple, dtype: torch.dtype, stream: int | None = None, capture: int = 0):
        """An uninitialised tensor of ``shape`` in the arena for work on ``stream`` (a
        cudaStream_t as an integer; None: the device's current stream), or None when it does not
        fit. capture nonzero: for the stream's CUDA graph capture (on a CPU buffer the value is
        the id of a stand-in capture): a freed block of that capture or memory no block has had,
        kept out of the arena's reuse after the capture (the graph may still replay into it)."""
        t0 = time.perf_counter() if STEP_US is not None else 0.0
        if stream is None:
            stream = stream_handle(self.device)
        t1 = time.perf_counter() if STEP_US is not None else 0.0
        code = _DLPACK_DTYPES.get(dtype)
        block_shape = list(shape) if code else [*shape[:-1], shape[-1] * dtype.itemsize]
        capsule = core.arena_tensor(
            self.group_id, self.rank, block_shape, *(code or (1, 8)), stream, capture
        )
        if capsule is None:
            return None
        t2 = time.perf_counter() if STEP_US is not None else 0.0
        out = torch.from_dlpack(capsule)
        if code is None:  # the uint8 block, typed
            out = _own_tensor(out, dtype, shape)
        if STEP_US is not None:
            _record_steps(CORE_STEPS, (t0, t1, t2, time.perf_counter()))
        return out

    def free_bytes(self) -> int:
        return core.arena_free_bytes(self.group_id, self.rank)

    def record_use(self, address: int, stream: int) -> bool:
        return core.arena_record_use(self.group_id, self.rank, address, stream)

    def release_captures(self) -> int:
        return core.arena_release_captures(self.group_id, self.rank)


def note_stream_use(tensor: torch.Tensor, stream: int) -> bool:
    """Records ``stream`` (a cudaStream_t as an integer) as a user of ``tensor``'s arena block, so
    the block's next allocation for another stream waits for it (torch's record_stream, hooked
    below); False when the tensor is not over a block of the core's arena (the Python allocator
    does not track users: an A/B path)."""
    address = tensor.untyped_storage().data_ptr()
    with _lock:
        arenas = list(_arenas.values())
    for arena in arenas:
        if isinstance(arena, CoreArena) and arena.address <= address < arena.address + arena.size:
            return arena.record_use(address, stream)
    return False


_torch_record_stream = None  # torch.Tensor.record_stream before _hook_record_stream
_warned_streams: set = set()


# The current stream's cudaStream_t in one call (CUDA builds of torch; what torch.compile's
# generated code uses): torch.cuda.current_stream builds a Stream object first, 13-15 us of a
# dispatch's host path on the GPU machine (run 119's trace).
_raw_stream = getattr(torch._C, "_cuda_getCurrentRawStream", None)


def stream_handle(device: torch.device) -> int:
    """The current stream of ``device`` as an integer cudaStream_t (0 off CUDA)."""
    if device.type != "cuda":
        return 0
    if _raw_stream is not None and device.index is not None:
        return _raw_stream(device.index)
    return torch.cuda.current_stream(device).cuda_stream


def _stream_handle(stream) -> int | None:
    """The cudaStream_t (an integer) of a torch.cuda.Stream or a torch.Stream; None, with one
    warning per type, for anything else (then nothing is recorded: the hook never raises where
    torch's record_stream did not)."""
    handle = getattr(stream, "cuda_stream", None)
    if handle is not None:
        return handle
    try:  # torch.Stream (the accelerator API): the same stream as a torch.cuda.Stream
        return torch.cuda.Stream(
            stream_id=stream.stream_id,
            device_index=stream.device_index,
            device_type=stream.device_type,
        ).cuda_stream
    except Exception:  # noqa: BLE001 - an unknown stream object: warn, do not fail the call
        kind = type(stream).__name__
        if kind not in _warned_streams:
            _warned_streams.add(kind)
            warnings.warn(
                f"fused_a2a: record_stream with a {kind} (not a CUDA stream): an arena tensor's "
                "block does not learn of that stream's use",
                RuntimeWarning,
                stacklevel=3,
            )
        return None


def _hook_record_stream() -> None:
    """torch.Tensor.record_stream tells the caching allocator that another stream uses a tensor;
    for memory it did not allocate it does nothing. A pipeline that hands recv_x to another stream
    and relies on it (instead of ordering the streams) would see the arena reuse the block under
    that stream's reads. So, once an arena exists, record_stream also records the stream with the
    tensor's arena block (no CUDA call; one address check for other tensors). Torch's own C++
    callers of recordStream are not seen."""
    global _torch_record_stream
    if _torch_record_stream is not None:
        return
    original = torch.Tensor.record_stream

    def record_stream(self, stream):
        original(self, stream)
        if _arenas and self.is_cuda:
            handle = _stream_handle(stream)
            if handle is not None:
                note_stream_use(self, handle)

    record_stream.__doc__ = original.__doc__
    _torch_record_stream = original
    torch.Tensor.record_stream = record_stream


def register(group_id: int, rank: int, device: torch.device) -> None:
    """After the buffer of ``group_id`` is connected, if it has an arena."""
    mode = os.environ.get("FUSED_A2A_TORCH_ARENA_ALLOC", "core")
    if mode not in ("core", "python"):
        raise ValueError(f"FUSED_A2A_TORCH_ARENA_ALLOC must be 'core' or 'python', got {mode!r}")
    arena = (CoreArena if mode == "core" else RowArena)(group_id, rank, device)
    if arena.size > 0:
        with _lock:
            _arenas[group_id] = arena
        if device.type == "cuda":
            _hook_record_stream()


def unregister(group_id: int) -> None:
    """At the buffer's release: no new blocks; live ones keep the memory until they die."""
    with _lock:
        _arenas.pop(group_id, None)
    core.arena_drop(group_id)


def release_captures() -> int:
    """Every arena's CUDA-graph blocks whose tensors are gone back to its free spans (bytes in
    all). A captured block otherwise never returns (a graph may replay into it, and the arena
    cannot see graphs), so a process capturing many graphs over time runs out of arena and its
    later captures take torch's memory (no direct rows). Only once every graph captured with
    these arenas is destroyed and its replays are complete (a device sync): the bench calls it
    after each graph it times."""
    with _lock:
        arenas = list(_arenas.values())
    return sum(a.release_captures() for a in arenas if isinstance(a, CoreArena))


def find(group_id: int) -> RowArena | CoreArena | None:
    with _lock:
        return _arenas.get(group_id)


def capturing(device: torch.device) -> bool:
    """Whether the device's current stream is capturing a CUDA graph (a module function, so that
    CPU tests can stand in for a capture)."""
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def empty(
    group_id: int, shape: tuple, dtype: torch.dtype, device: torch.device, stream: int | None = None
) -> torch.Tensor:
    """torch.empty(shape), in the group's output arena when it has one with room; ``stream``: the
    current stream as an integer when the caller has it (saves a lookup)."""
    arena = find(group_id)
    usable = arena is not None and arena.device == device
    # While the stream captures a CUDA graph: the core's arena gives memory it keeps for that
    # capture (the graph may replay into it as long as it lives), so that a captured static
    # dispatch writes its rows straight too (run 156, EP 4, 12 SMs: 820 us a captured dispatch,
    # its rows through the window, against 524 eager); the Python allocator stays out of captures.
    captured = usable and capturing(device)
    if captured and not isinstance(arena, CoreArena):
        usable = False
    out = None
    if usable:
        out = (
            arena.tensor(shape, dtype, stream, capture=1)
            if captured
            else arena.tensor(shape, dtype, stream)
        )
    if usable and math.prod(shape):  # a full arena is silent otherwise (the bench reports these)
        arena.counts["arena" if out is not None else "no_room"] += 1
    return out if out is not None else torch.empty(shape, dtype=dtype, device=device)


def counts(group_id: int) -> dict:
    """{"arena": outputs placed in the group's arena, "no_room": outputs that did not fit and
    went to torch}, since the buffer's creation; {} without an arena."""
    arena = find(group_id)
    return dict(arena.counts) if arena is not None else {}
