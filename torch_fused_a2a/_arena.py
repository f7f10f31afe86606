"""Torch's output arena: the dispatch's recv_x inside the communication buffer (opt-in).

The static dispatch's senders write rows straight into a receiver's recv_x when every peer can
reach it ("direct rows", csrc/kernels/cuda/dispatch.cu): 16 us less at EP 4, N = 4096 for JAX,
whose devices share one process (docs/DECISIONS.md). Torch's ranks are processes: they map each
other's communication buffers (CUDA IPC) but not each other's torch allocations. With
``FUSED_A2A_TORCH_ARENA_MB`` > 0 a normal-mode buffer gets an output arena of that size after its
data region (every peer maps it with the rest), and the dispatch takes recv_x from it when it
fits, else from torch (its rows then go through the receive window, as without an arena).

A block is a tensor over arena memory; it returns to the arena when the tensor dies. Like torch's
caching allocator, the memory is then reusable in stream order: the free records an event on the
device's current stream, and the dispatch that reuses the memory waits for it on its stream. A
block keeps the core buffer (and so the arena's memory) alive, also past the buffer's release.
"""

from __future__ import annotations

import collections
import itertools
import os
import threading

import numpy as np
import torch

import fused_a2a_core as core

ALIGN = 512  # bytes: every block starts 16-byte aligned (the kernels' 16-byte row accesses)
_arenas: dict[int, RowArena] = {}
_lock = threading.Lock()


def arena_bytes_env() -> int:
    """FUSED_A2A_TORCH_ARENA_MB (default 0: no arena), as bytes (a multiple of 64)."""
    text = os.environ.get("FUSED_A2A_TORCH_ARENA_MB", "0")
    try:
        mb = float(text)
    except ValueError:
        mb = -1.0
    if mb < 0:
        raise ValueError(f"FUSED_A2A_TORCH_ARENA_MB must be a number of MB >= 0, got {text!r}")
    return int(mb * (1 << 20)) // 64 * 64


class FreeList:
    """First-fit intervals of [0, size): alloc returns (offset, bytes taken, events to wait for) or
    None; free takes the marks that order the block's last uses, {stream: (sequence, event)}.

    Events recorded on one stream complete in order, so a span keeps one mark per stream, the
    latest: a merge or a split never lengthens the waits (a list of every free's event grew by one
    per iteration while the host ran ahead of the GPU, and each allocation then waited for and
    queried all of them: ~200 us of host time an op in run 104)."""

    def __init__(self, size: int):
        self.size = size
        self.free_spans: list[list] = [[0, size, {}]] if size > 0 else []  # [start, end, marks]

    def alloc(self, nbytes: int):
        need = max(ALIGN, (nbytes + ALIGN - 1) // ALIGN * ALIGN)
        for i, (start, end, marks) in enumerate(self.free_spans):
            if end - start >= need:
                if end - start == need:
                    del self.free_spans[i]
                else:
                    self.free_spans[i] = [start + need, end, dict(marks)]
                return start, need, [event for _, event in marks.values()]
        return None

    def free(self, start: int, nbytes: int, marks: dict) -> None:
        end = start + nbytes
        i = 0
        while i < len(self.free_spans) and self.free_spans[i][0] < start:
            i += 1
        span = [start, end, dict(marks)]
        self.free_spans.insert(i, span)
        if i + 1 < len(self.free_spans) and self.free_spans[i + 1][0] == end:
            nxt = self.free_spans.pop(i + 1)
            span[1] = nxt[1]
            _merge_marks(span[2], nxt[2])
        if i > 0 and self.free_spans[i - 1][1] == start:
            prev = self.free_spans.pop(i - 1)
            span[0] = prev[0]
            _merge_marks(span[2], prev[2])

    def prune(self, done) -> None:
        """Drops the marks whose events done(event) says are complete."""
        for span in self.free_spans:
            span[2] = {key: mark for key, mark in span[2].items() if not done(mark[1])}

    def free_bytes(self) -> int:
        return sum(end - start for start, end, _ in self.free_spans)


def _merge_marks(into: dict, other: dict) -> None:
    """into gets, per stream, the later of its mark and other's."""
    for key, mark in other.items():
        if key not in into or into[key][0] < mark[0]:
            into[key] = mark


class _Block:
    """Arena memory [address, address + nbytes) seen as a uint8 array; back to the arena on
    deletion (when the last tensor over it dies)."""

    def __init__(self, arena: RowArena, offset: int, nbytes: int):
        self.arena, self.offset, self.nbytes = arena, offset, nbytes
        address = arena.address + offset
        interface = {"shape": (nbytes,), "typestr": "|u1", "data": (address, False), "version": 3}
        if arena.device.type == "cuda":  # no "stream" entry: the consumer syncs nothing
            self.__cuda_array_interface__ = interface
        else:
            self.__array_interface__ = interface

    def __del__(self):
        self.arena.release(self.offset, self.nbytes)


class RowArena:
    """This rank's output arena of one core buffer."""

    def __init__(self, group_id: int, rank: int, device: torch.device):
        self.address, self.size = core.buffer_arena(group_id, rank)
        self.keep = core.buffer_ref(group_id, rank)  # the memory lives while a block does
        self.device = device
        self.spans = FreeList(self.size)
        self.lock = threading.Lock()
        # Freed blocks wait here (a deque's append needs no lock) until the next allocation takes
        # the lock: a tensor may die inside an allocation (a garbage-collection pass), whose span
        # walk must not change under it.
        self.pending = collections.deque()
        self.sequence = itertools.count()  # orders the frees' events of one stream

    def tensor(self, shape: tuple, dtype: torch.dtype) -> torch.Tensor | None:
        """An uninitialised tensor of ``shape`` in the arena, or None when it does not fit."""
        nbytes = int(np.prod(shape)) * dtype.itemsize
        if nbytes == 0:
            return None
        with self.lock:
            self._take_pending()
            if self.device.type == "cuda":
                self.spans.prune(lambda event: event.query())
            got = self.spans.alloc(nbytes)
        if got is None:
            return None
        offset, taken, events = got
        if self.device.type == "cuda":
            stream = torch.cuda.current_stream(self.device)
            for event in events:  # the last uses of this memory before its free
                stream.wait_event(event)
            raw = torch.as_tensor(_Block(self, offset, taken), device=self.device)
        else:
            raw = torch.from_numpy(np.asarray(_Block(self, offset, taken)))
        # A tensor of its own over the block's storage, not a view (custom ops' outputs)
        out = torch.empty(0, dtype=dtype, device=self.device)
        return out.set_(raw.untyped_storage(), 0, shape)

    def release(self, offset: int, nbytes: int) -> None:
        marks = {}
        if self.device.type == "cuda":
            try:
                stream = torch.cuda.current_stream(self.device)
                event = torch.cuda.Event()
                event.record(stream)
                marks[stream.cuda_stream] = (next(self.sequence), event)
            except Exception:  # noqa: BLE001 (interpreter shutdown: nothing runs after it)
                pass
        self.pending.append((offset, nbytes, marks))

    def _take_pending(self) -> None:  # under self.lock
        while self.pending:
            self.spans.free(*self.pending.popleft())

    def free_bytes(self) -> int:
        with self.lock:
            self._take_pending()
            return self.spans.free_bytes()


def register(group_id: int, rank: int, device: torch.device) -> None:
    """After the buffer of ``group_id`` is connected, if it has an arena."""
    arena = RowArena(group_id, rank, device)
    if arena.size > 0:
        with _lock:
            _arenas[group_id] = arena


def unregister(group_id: int) -> None:
    """At the buffer's release: no new blocks; live ones keep the memory until they die."""
    with _lock:
        _arenas.pop(group_id, None)


def find(group_id: int) -> RowArena | None:
    with _lock:
        return _arenas.get(group_id)


def empty(group_id: int, shape: tuple, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """torch.empty(shape), in the group's output arena when it has one with room."""
    arena = find(group_id)
    # Not while the stream is capturing a CUDA graph: the graph's allocations are torch's private
    # pool, and the event waits and queries of a reused block are not capturable
    usable = arena is not None and arena.device == device
    if usable and device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        usable = False
    out = arena.tensor(shape, dtype) if usable else None
    return out if out is not None else torch.empty(shape, dtype=dtype, device=device)
