"""Torch's output arena (torch_fused_a2a/_arena.py, FUSED_A2A_TORCH_ARENA_MB): the dispatch's recv_x
in the communication buffer, where the CUDA static kernel's senders write rows straight into it.
Here on CPU ranks (the arena is in the shared-memory buffer there too): the free list, outputs in
the arena with the same bits as without it, blocks back in the arena when their tensors die, and
an arena tensor outliving its buffer's release. tests/test_gpu_normal.py runs the GPU suite with
it ("arena", with FUSED_A2A_CUDA_DIRECT=require)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from mp import run_ranks

from torch_fused_a2a._arena import ALIGN, FreeList


def test_free_list_first_fit_merge_and_streams():
    spans = FreeList(8 * ALIGN)
    a = spans.alloc(1)  # one aligned unit
    b = spans.alloc(3 * ALIGN)
    c = spans.alloc(4 * ALIGN)
    assert (a[0], a[1]) == (0, ALIGN) and (b[0], b[1]) == (ALIGN, 3 * ALIGN)
    assert (c[0], c[1]) == (4 * ALIGN, 4 * ALIGN) and spans.free_bytes() == 0
    assert spans.alloc(1) is None  # full
    spans.free(b[0], b[1], {"s": "S"})
    spans.free(a[0], a[1], {"s": "S", "t": "T"})  # merges with b's span: one span [0, 4 units)
    assert spans.free_spans == [[0, 4 * ALIGN, {"s": "S", "t": "T"}]]
    d = spans.alloc(2 * ALIGN)  # carved from the merged span: after both streams' uses
    assert d == (0, 2 * ALIGN, ["S", "T"])
    assert spans.free_spans == [[2 * ALIGN, 4 * ALIGN, {"s": "S", "t": "T"}]]
    spans.free(c[0], c[1], {})
    spans.free(d[0], d[1], {"u": "U"})
    assert spans.free_spans == [[0, 8 * ALIGN, {"u": "U", "s": "S", "t": "T"}]]
    assert spans.free_bytes() == 8 * ALIGN
    assert spans.alloc(9 * ALIGN) is None


def test_free_list_streams_stay_one_per_stream():
    """A block freed and taken again every iteration on one stream: its span names that stream
    once, however many frees merged into it."""
    spans = FreeList(8 * ALIGN)
    for step in range(200):
        start, nbytes, streams = spans.alloc(3 * ALIGN)
        assert streams == (["S"] if step else [])
        spans.free(start, nbytes, {"s": "S"})
    assert spans.free_spans == [[0, 8 * ALIGN, {"s": "S"}]]


def test_free_list_random_against_a_byte_map():
    """Random allocations and frees: blocks never overlap and stay inside the arena, the free
    bytes match a byte map of what is taken, and freeing everything leaves one span."""
    rng = np.random.default_rng(5)
    size = 64 * ALIGN
    spans, taken, live = FreeList(size), np.zeros(size, bool), []
    for step in range(3000):
        if live and (rng.random() < 0.45 or spans.free_bytes() < ALIGN):
            start, nbytes = live.pop(int(rng.integers(len(live))))
            assert taken[start : start + nbytes].all()
            taken[start : start + nbytes] = False
            spans.free(start, nbytes, {"s": step})
        else:
            got = spans.alloc(int(rng.integers(1, 9 * ALIGN)))
            if got is None:
                continue
            start, nbytes, _ = got
            assert start % ALIGN == 0 and start + nbytes <= size
            assert not taken[start : start + nbytes].any(), f"step {step}: overlap at {start}"
            taken[start : start + nbytes] = True
            live.append((start, nbytes))
        assert spans.free_bytes() == size - int(taken.sum())
    for start, nbytes in live:
        spans.free(start, nbytes, {})
    assert [span[:2] for span in spans.free_spans] == [[0, size]]


def _one_rank_cpu_buffer(gid: int, arena_bytes: int) -> None:
    """A connected, sealed one-rank CPU buffer of group ``gid`` with an output arena."""
    import fused_a2a_core as core
    from fused_a2a._common import PLATFORM_CPU

    info = core.buffer_create(gid, 0, 1, 4096, PLATFORM_CPU, 0, arena_bytes)
    core.buffer_connect(gid, 0, [info])
    core.buffer_seal(gid, 0)


def test_core_arena_blocks_as_dlpack_tensors():
    """The core's arena (csrc/core/arena.cc) on a one-rank CPU buffer: blocks come back as torch
    tensors of their own over the arena (DLPack), 512-byte aligned and first fit, typed (bf16,
    f32, and FP8 through a uint8 block), None when nothing fits; a block returns when torch frees
    the tensor, also a capsule nobody took; a tensor outlives the buffer's release."""
    import gc

    import torch

    import fused_a2a_core as core
    from torch_fused_a2a._arena import CoreArena

    gid = 0x5EED0A
    size = 64 * ALIGN
    _one_rank_cpu_buffer(gid, size)
    arena = CoreArena(gid, 0, torch.device("cpu"))
    assert arena.size == size and arena.free_bytes() == size
    a = arena.tensor((3, 100), torch.bfloat16)  # 600 bytes: two aligned units
    b = arena.tensor((4, 8), torch.float32)
    f = arena.tensor((2, 256), torch.float8_e4m3fn)
    assert a.dtype == torch.bfloat16 and a.shape == (3, 100) and a._base is None
    assert b.dtype == torch.float32 and f.dtype == torch.float8_e4m3fn and f.shape == (2, 256)
    assert f._base is None and a.is_contiguous() and f.is_contiguous()
    assert [t.data_ptr() - arena.address for t in (a, b, f)] == [0, 2 * ALIGN, 3 * ALIGN]
    assert arena.free_bytes() == size - 4 * ALIGN
    a.fill_(2.5)
    b.copy_(torch.arange(32, dtype=torch.float32).view(4, 8))
    assert float(a.float().sum()) == 2.5 * 300 and float(b.sum()) == sum(range(32))
    assert arena.tensor((size,), torch.uint8) is None  # larger than the free spans
    assert arena.tensor((0, 7), torch.bfloat16) is None
    view = a[1:]  # a view keeps the block
    del a
    gc.collect()
    assert arena.free_bytes() == size - 4 * ALIGN
    del view, f
    gc.collect()
    assert arena.free_bytes() == size - ALIGN  # b's unit is still taken
    c = arena.tensor((ALIGN,), torch.uint8)  # first fit: the freed space before b
    assert c.data_ptr() == arena.address
    unused = core.arena_tensor(gid, 0, [5], 1, 8, 0)  # a capsule nobody takes
    assert arena.free_bytes() == size - 3 * ALIGN
    del unused
    gc.collect()
    assert arena.free_bytes() == size - 2 * ALIGN
    from torch_fused_a2a import _arena

    _arena.unregister(gid)  # the frontend's release: the core's arena too
    core.buffer_release(gid)
    assert float(b.sum()) == sum(range(32))  # b's block keeps the memory
    del b, c
    gc.collect()
    with pytest.raises(RuntimeError, match="no fused_a2a buffer for group"):
        core.arena_free_bytes(gid, 0)


def test_core_arena_random_against_a_byte_map():
    """The core's free list under random allocations and frees, some freed on other threads (as
    torch frees storages): blocks never overlap and stay inside the arena, the free bytes match a
    byte map, and freeing everything leaves the whole arena."""
    import concurrent.futures
    import gc

    import torch

    import fused_a2a_core as core
    from torch_fused_a2a._arena import CoreArena

    gid = 0x5EED0B
    size = 64 * ALIGN
    _one_rank_cpu_buffer(gid, size)
    try:
        arena = CoreArena(gid, 0, torch.device("cpu"))
        rng = np.random.default_rng(9)
        taken, live = np.zeros(size, bool), []
        pool = concurrent.futures.ThreadPoolExecutor(2)
        for step in range(800):
            if live and (rng.random() < 0.45 or arena.free_bytes() < ALIGN):
                tensor, start, nbytes = live.pop(int(rng.integers(len(live))))
                taken[start : start + nbytes] = False
                if step % 3:
                    del tensor
                else:  # the last reference dies on another thread
                    pool.submit(lambda t: t.numel(), tensor).result(timeout=10)
                    del tensor
            else:
                nbytes = int(rng.integers(1, 9 * ALIGN))
                tensor = arena.tensor((nbytes,), torch.uint8)
                if tensor is None:
                    assert not any(
                        not taken[i : i + nbytes].any() for i in range(0, size - nbytes + 1, ALIGN)
                    ), f"step {step}: {nbytes} bytes fit but no block came"
                    continue
                start = tensor.data_ptr() - arena.address
                rounded = (nbytes + ALIGN - 1) // ALIGN * ALIGN
                assert start % ALIGN == 0 and start + rounded <= size
                assert not taken[start : start + rounded].any(), f"step {step}: overlap"
                taken[start : start + rounded] = True
                live.append((tensor, start, rounded))
            assert arena.free_bytes() == size - int(taken.sum()), f"step {step}"
        pool.shutdown(wait=True)
        del live[:]
        tensor = None  # the last block allocated
        gc.collect()
        assert arena.free_bytes() == size
    finally:
        core.arena_drop(gid)
        core.buffer_release(gid)


def test_release_captures_returns_dead_captured_blocks():
    """_arena.release_captures (the bench's, after each graph it times): every captured block
    whose tensor is gone returns to the free spans, merged with its neighbours, whether its
    capture could reuse it or not (another stream used it); live captured blocks stay; the
    bytes released are returned."""
    import gc

    import torch

    import fused_a2a_core as core
    from torch_fused_a2a import _arena

    gid = 0x5EED0D
    size = 16 * ALIGN
    _one_rank_cpu_buffer(gid, size)
    try:
        _arena.register(gid, 0, torch.device("cpu"))
        arena = _arena.find(gid)

        def block(units, capture=0, stream=0):
            return arena.tensor((units * ALIGN,), torch.uint8, stream, capture)

        def offset(t):
            return t.data_ptr() - arena.address

        dead = block(3, capture=1)
        shared = block(2, capture=2)
        live = block(1, capture=3)
        assert [offset(t) for t in (dead, shared, live)] == [13 * ALIGN, 11 * ALIGN, 10 * ALIGN]
        assert core.arena_record_use(gid, 0, shared.data_ptr(), 9)
        del dead, shared
        gc.collect()
        assert arena.free_bytes() == 10 * ALIGN
        assert _arena.release_captures() == 5 * ALIGN
        assert arena.free_bytes() == 15 * ALIGN and _arena.release_captures() == 0
        low, high = block(10), block(5)  # both spans, the released one merged whole
        assert (offset(low), offset(high)) == (0, 11 * ALIGN)
        assert offset(live) == 10 * ALIGN and block(1) is None
    finally:
        _arena.unregister(gid)
        core.buffer_release(gid)


def test_core_arena_captured_blocks():
    """Blocks for a CUDA graph's capture (on a CPU buffer, capture ids stand in for captures):
    from the arena's top, only from memory no uncaptured block has had (so no earlier use can race
    a replay), never back in the free spans (a graph may still replay into them); a capture's
    freed block serves that capture's later blocks on the same stream (whole), not another
    capture's, nor a stream's other than its own, nor once another stream was recorded as its
    user; uncaptured blocks keep first fit below."""
    import gc

    import torch

    import fused_a2a_core as core
    from torch_fused_a2a._arena import CoreArena

    gid = 0x5EED0C
    size = 16 * ALIGN
    _one_rank_cpu_buffer(gid, size)
    try:
        arena = CoreArena(gid, 0, torch.device("cpu"))

        def offset(t):
            return None if t is None else t.data_ptr() - arena.address

        def block(units, capture=0, stream=0):
            return arena.tensor((units * ALIGN,), torch.uint8, stream, capture)

        eager = block(2)
        assert offset(eager) == 0
        del eager
        gc.collect()
        assert arena.free_bytes() == size
        top = block(3, capture=1)
        below_top = block(1, capture=1)
        assert (offset(top), offset(below_top)) == (13 * ALIGN, 12 * ALIGN)
        again = block(2)  # first fit: the memory the first block had
        assert offset(again) == 0
        top.fill_(7)
        del top
        gc.collect()
        assert arena.free_bytes() == 10 * ALIGN  # the captured blocks stay out of the free spans
        assert offset(block(1, capture=2)) == 11 * ALIGN  # another capture: not capture 1's block
        assert offset(block(1, capture=1, stream=5)) == 10 * ALIGN  # another stream: nor that
        reused = block(2, capture=1)  # the same capture and stream: the freed 3 units, whole
        assert offset(reused) == 13 * ALIGN and arena.free_bytes() == 8 * ALIGN
        assert core.arena_record_use(gid, 0, reused.data_ptr(), 9)
        del reused  # another stream used it: not reused, even by its capture
        gc.collect()
        assert offset(block(1, capture=1)) == 9 * ALIGN
        rest = block(7)  # every free byte, up to the captured ones
        assert offset(rest) == 2 * ALIGN and block(1) is None
        assert block(1, capture=3) is None  # nothing free at all
        del rest
        gc.collect()
        assert arena.free_bytes() == 7 * ALIGN
        # [2, 9) units are free again but were used: no captured block there, however small
        assert block(1, capture=3) is None
        small = block(1)  # the uncaptured blocks still take it
        assert offset(small) == 2 * ALIGN
    finally:
        core.arena_drop(gid)
        core.buffer_release(gid)


@pytest.mark.parametrize("alloc", ["core", "python"])
def test_empty_under_a_capture(monkeypatch, alloc):
    """_arena.empty while a CUDA graph is captured (stood in for on a CPU buffer): the core's
    arena places the output in never-used memory at its top, the Python allocator leaves it to
    torch (outside the arena)."""
    import torch

    import fused_a2a_core as core
    from torch_fused_a2a import _arena

    gid = 0x5EED0D
    size = 16 * ALIGN
    monkeypatch.setenv("FUSED_A2A_TORCH_ARENA_ALLOC", alloc)
    _one_rank_cpu_buffer(gid, size)
    cpu = torch.device("cpu")
    _arena.register(gid, 0, cpu)
    try:
        arena = _arena.find(gid)
        eager = _arena.empty(gid, (4, 128), torch.bfloat16, cpu)  # 1 KB: 2 units
        assert eager.data_ptr() == arena.address
        monkeypatch.setattr(_arena, "capturing", lambda device: True)
        captured = _arena.empty(gid, (4, 128), torch.bfloat16, cpu)
        in_arena = arena.address <= captured.data_ptr() < arena.address + size
        if alloc == "core":
            assert captured.data_ptr() == arena.address + 14 * ALIGN
        else:
            assert not in_arena
        captured.fill_(1.0)
        assert float(captured.float().sum()) == 4 * 128
    finally:
        _arena.unregister(gid)
        core.buffer_release(gid)


def _rank_arena(rank, world):
    import gc

    import torch
    import torch.distributed as dist

    import torch_fused_a2a as tfa
    from torch_fused_a2a import _arena, fused_a2a

    group = dist.group.WORLD
    gen = torch.Generator().manual_seed(11 + rank)
    n, h, e, k = 96, 128, 24, 4
    outs, in_arena = [], []
    for _ in range(3):  # the first dynamic dispatch takes the exact path, the others speculate
        x = torch.randn(n, h, generator=gen).to(torch.bfloat16)
        idx = torch.argsort(torch.rand(n, e, generator=gen), 1)[:, :k].contiguous()
        idx[torch.rand(n, k, generator=gen) < 0.2] = -1
        w = torch.rand(n, k, generator=gen)
        xg, wg = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
        rx, ridx, rw, tpe, handle = tfa.fused_dispatch(xg, idx, wg, e, group)
        out, _ = tfa.fused_combine(rx * 2, group, handle)
        gx, gw = torch.autograd.grad(out.float().sum() + rw.sum(), (xg, wg))
        arena = _arena.find(fused_a2a._buffer.group_id)
        in_arena.append(
            arena is not None and arena.address <= rx.data_ptr() < arena.address + arena.size
        )
        outs.append(
            [
                t.detach().contiguous().view(-1).view(torch.uint8).numpy().copy()
                for t in (rx, ridx, rw, tpe, out, gx, gw)
            ]  # fmt: skip
        )
        del rx, ridx, rw, tpe, handle, out, gx, gw, xg, wg
    gc.collect()
    arena = _arena.find(fused_a2a._buffer.group_id)
    all_back = arena is None or arena.free_bytes() == arena.size
    survives = None
    if arena is not None:  # an arena tensor outlives its buffer's release
        keep = _arena.empty(fused_a2a._buffer.group_id, (4, h), torch.bfloat16, arena.device)
        keep.fill_(1.5)
        fused_a2a._buffer.release()
        survives = keep.data_ptr() >= arena.address and float(keep.float().sum()) == 1.5 * 4 * h
    return dict(outs=outs, in_arena=in_arena, all_back=all_back, survives=survives)


@pytest.mark.parametrize("alloc", ["core", "python"])
def test_dispatch_outputs_in_arena_same_bits(alloc):
    plain = run_ranks(_rank_arena, 3, timeout=180, env={"FUSED_A2A_TORCH_ARENA_MB": "0"})
    env = {"FUSED_A2A_TORCH_ARENA_MB": "8", "FUSED_A2A_TORCH_ARENA_ALLOC": alloc}
    arena = run_ranks(_rank_arena, 3, timeout=180, env=env)
    for r in range(3):
        assert plain[r]["in_arena"] == [False] * 3 and plain[r]["survives"] is None
        assert arena[r]["in_arena"] == [True] * 3, f"rank {r}: recv_x not in the arena"
        assert arena[r]["all_back"], f"rank {r}: arena blocks not returned"
        assert arena[r]["survives"], f"rank {r}: an arena tensor did not outlive the release"
        for i, (a, b) in enumerate(zip(plain[r]["outs"], arena[r]["outs"], strict=True)):
            for j, (u, v) in enumerate(zip(a, b, strict=True)):
                assert np.array_equal(u, v), f"rank {r} call {i} output {j} differs in the arena"


def test_arena_size_env_rejects_garbage(monkeypatch):
    from torch_fused_a2a._arena import arena_bytes_env

    monkeypatch.setenv("FUSED_A2A_TORCH_ARENA_MB", "1.5")
    assert arena_bytes_env() == 3 << 19
    for bad in ("-1", "lots"):
        monkeypatch.setenv("FUSED_A2A_TORCH_ARENA_MB", bad)
        with pytest.raises(ValueError, match="FUSED_A2A_TORCH_ARENA_MB"):
            arena_bytes_env()


def test_arena_size_default_by_platform(monkeypatch):
    """2048 MB for a CUDA buffer (session 21's measured default), none for CPU buffers; the
    variable overrides both, 0 included."""
    from torch_fused_a2a._arena import arena_bytes_env

    monkeypatch.delenv("FUSED_A2A_TORCH_ARENA_MB", raising=False)
    assert arena_bytes_env(cuda=True) == 2048 << 20
    assert arena_bytes_env(cuda=False) == 0
    monkeypatch.setenv("FUSED_A2A_TORCH_ARENA_MB", "0")
    assert arena_bytes_env(cuda=True) == 0
    monkeypatch.setenv("FUSED_A2A_TORCH_ARENA_MB", "8")
    assert arena_bytes_env(cuda=False) == 8 << 20


def test_arena_counts_outputs_placed_and_sent_to_torch():
    """empty() counts each output the arena took and each it had no room for (the bench prints
    both: a full arena is otherwise silent); zero-size outputs count as neither."""
    import torch

    from torch_fused_a2a import _arena

    class FakeArena:  # room for outputs of up to 64 bytes
        device = torch.device("cpu")

        def __init__(self):
            self.counts = {"arena": 0, "no_room": 0}

        def tensor(self, shape, dtype, stream=None):
            nbytes = math.prod(shape) * dtype.itemsize
            return torch.zeros(shape, dtype=dtype) if 0 < nbytes <= 64 else None

    group_id = 987654321
    _arena._arenas[group_id] = FakeArena()
    try:
        for shape in ((4, 4), (8, 8), (0, 8), (2, 8)):
            out = _arena.empty(group_id, shape, torch.float32, torch.device("cpu"))
            assert tuple(out.shape) == shape and out.dtype == torch.float32
        assert _arena.counts(group_id) == {"arena": 2, "no_room": 1}
    finally:
        _arena._arenas.pop(group_id)
    assert _arena.counts(group_id) == {}


def test_recorded_streams_come_back_with_the_free_span():
    """record_stream on an arena tensor (hooked to note_stream_use) records the stream with its
    block; at the free, the span carries the allocation's stream and the recorded ones, which the
    next allocation for another stream waits for (CUDA). A tensor outside the arena, or the same
    stream twice, records nothing new."""
    import torch

    import fused_a2a_core as core
    from torch_fused_a2a._arena import CoreArena, note_stream_use

    gid = 0x5EC0
    _one_rank_cpu_buffer(gid, 16 * ALIGN)
    from torch_fused_a2a import _arena

    arena = CoreArena(gid, 0, torch.device("cpu"))
    _arena._arenas[gid] = arena
    try:
        block = arena.tensor((4, 32), torch.float32, stream=11)
        other = arena.tensor((2, 32), torch.float32, stream=33)
        assert note_stream_use(block, 22) and note_stream_use(block, 22)
        assert not note_stream_use(torch.zeros(4), 22)
        assert core.arena_free_span_streams(gid, 0) == []  # the rest of the arena: never used
        del block
        assert sorted(core.arena_free_span_streams(gid, 0)) == [11, 22]
        del other
        assert sorted(core.arena_free_span_streams(gid, 0)) == [11, 22, 33]
        assert arena.free_bytes() == arena.size
    finally:
        _arena._arenas.pop(gid, None)
        core.arena_drop(gid)
        core.buffer_release(gid)


def test_record_stream_hook_chains_to_torch(monkeypatch):
    """The hook keeps torch's record_stream (called first, with the same arguments) and is
    installed once."""
    import torch

    from torch_fused_a2a import _arena

    calls = []
    monkeypatch.setattr(torch.Tensor, "record_stream", lambda t, s: calls.append((t, s)))
    monkeypatch.setattr(_arena, "_torch_record_stream", None)
    _arena._hook_record_stream()
    hooked = torch.Tensor.record_stream
    _arena._hook_record_stream()
    assert torch.Tensor.record_stream is hooked
    t = torch.zeros(2)
    t.record_stream("s")
    assert len(calls) == 1 and calls[0][0] is t and calls[0][1] == "s"


def _rank_default_arena_fallback(rank, world):
    import warnings

    import torch.distributed as dist

    from torch_fused_a2a._buffers import _create_default_arena

    made, released = [], []

    def create(arena):  # rank 1 has no room for the arena
        if arena and rank == 1:
            raise RuntimeError("fused_a2a: cannot allocate the buffer (test)")
        made.append(arena)
        return f"info {rank} {arena}"

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        info, with_arena = _create_default_arena(
            dist.group.WORLD, world, create, lambda: released.append(True), 1 << 20
        )
    roomy, _ = _create_default_arena(dist.group.WORLD, world, lambda a: f"ok {a}", None, 64)
    return dict(
        info=info,
        with_arena=with_arena,
        made=made,
        released=len(released),
        warned=[str(w.message) for w in caught],
        roomy=roomy,
    )


def test_default_arena_falls_back_together_where_a_rank_has_no_room():
    """The default arena (FUSED_A2A_TORCH_ARENA_MB unset) is dropped on every rank, with a
    warning naming the ranks, when one rank cannot allocate it; the ranks that had made theirs
    release them first. With room everywhere, every rank keeps it."""
    res = run_ranks(_rank_default_arena_fallback, 3, timeout=120)
    for r, got in enumerate(res):
        assert got["info"] == f"info {r} 0" and not got["with_arena"], got
        assert got["made"] == ([0] if r == 1 else [1 << 20, 0]), got
        assert got["released"] == (0 if r == 1 else 1), got
        assert len(got["warned"]) == 1 and "ranks [1]" in got["warned"][0], got
        assert got["roomy"] == "ok 64", got


def test_record_stream_hook_stream_handles():
    """A torch.cuda.Stream-like object gives its cuda_stream; an unknown object gives None with one
    warning per type (the hook never raises where torch's record_stream did not)."""
    import warnings

    from torch_fused_a2a import _arena

    class CudaLike:
        cuda_stream = 1234

    class Unknown:
        pass

    assert _arena._stream_handle(CudaLike()) == 1234
    _arena._warned_streams.discard("Unknown")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert _arena._stream_handle(Unknown()) is None
        assert _arena._stream_handle(Unknown()) is None
    assert len(caught) == 1 and "Unknown" in str(caught[0].message)
