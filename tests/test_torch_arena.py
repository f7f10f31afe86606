"""Torch's output arena (torch_fused_a2a/_arena.py, FUSED_A2A_TORCH_ARENA_MB): the dispatch's recv_x
in the communication buffer, where the CUDA static kernel's senders write rows straight into it.
Here on CPU ranks (the arena is in the shared-memory buffer there too): the free list, outputs in
the arena with the same bits as without it, blocks back in the arena when their tensors die, and
an arena tensor outliving its buffer's release. tests/test_gpu_normal.py runs the GPU suite with
it ("arena", with FUSED_A2A_CUDA_DIRECT=require)."""

from __future__ import annotations

import numpy as np
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


def test_dispatch_outputs_in_arena_same_bits():
    plain = run_ranks(_rank_arena, 3, timeout=180, env={"FUSED_A2A_TORCH_ARENA_MB": "0"})
    arena = run_ranks(_rank_arena, 3, timeout=180, env={"FUSED_A2A_TORCH_ARENA_MB": "8"})
    for r in range(3):
        assert plain[r]["in_arena"] == [False] * 3 and plain[r]["survives"] is None
        assert arena[r]["in_arena"] == [True] * 3, f"rank {r}: recv_x not in the arena"
        assert arena[r]["all_back"], f"rank {r}: arena blocks not returned"
        assert arena[r]["survives"], f"rank {r}: an arena tensor did not outlive the release"
        for i, (a, b) in enumerate(zip(plain[r]["outs"], arena[r]["outs"], strict=True)):
            for j, (u, v) in enumerate(zip(a, b, strict=True)):
                assert np.array_equal(u, v), f"rank {r} call {i} output {j} differs in the arena"


def test_arena_size_env_rejects_garbage(monkeypatch):
    import pytest

    from torch_fused_a2a._arena import arena_bytes_env

    monkeypatch.setenv("FUSED_A2A_TORCH_ARENA_MB", "1.5")
    assert arena_bytes_env() == 3 << 19
    for bad in ("-1", "lots"):
        monkeypatch.setenv("FUSED_A2A_TORCH_ARENA_MB", bad)
        with pytest.raises(ValueError, match="FUSED_A2A_TORCH_ARENA_MB"):
            arena_bytes_env()
