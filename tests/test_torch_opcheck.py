"""torch.library.opcheck on the custom ops (schema, fake kernels, autograd registration).

Each op is collective, so opcheck runs in a one-rank gloo group (a real process): every call opcheck
makes is then a complete collective on its own.
"""

from __future__ import annotations

import pytest
from mp import run_ranks


def _opcheck_all(rank, world):
    import torch
    import torch.distributed as dist

    import torch_fused_a2a  # noqa: F401  (registers the ops)
    from torch_fused_a2a.fused_a2a import get_buffer

    group = dist.group.WORLD
    torch.manual_seed(0)
    num_tokens, hidden, num_topk, num_experts = 6, 32, 2, 4
    x = torch.randn(num_tokens, hidden, dtype=torch.bfloat16)
    topk_idx = torch.randint(-1, num_experts, (num_tokens, num_topk))
    weights = torch.rand(num_tokens, num_topk)
    buffer = get_buffer(group, hidden * 2, torch.device("cpu"))
    gid, r = buffer.group_id, buffer.rank
    ops = torch.ops.fused_a2a
    checked = []
    # Static size (capacity >= 0); the dynamic size (capacity -1) has a data-dependent shape,
    # which opcheck's fake-tensor comparison supports through the unbacked size.
    for capacity in (num_tokens, 3, -1):
        args = (x, None, topk_idx, weights, num_experts, gid, r, world, capacity, 24)
        torch.library.opcheck(ops.dispatch.default, args)
        checked.append(f"dispatch[C={capacity}]")
    out = ops.dispatch(x, None, topk_idx, weights, num_experts, gid, r, world, num_tokens, 24)
    recv_x, _, recv_idx, recv_w, counts, src_token, _, stats, _ = out
    from torch_fused_a2a import _arena

    arena = _arena.find(gid)  # FUSED_A2A_TORCH_ARENA_MB: recv_x in the buffer's output arena
    if arena is not None and arena.address <= recv_x.data_ptr() < arena.address + arena.size:
        checked.append("recv_x in the arena")
    torch.library.opcheck(
        ops.combine.default,
        (
            recv_x,
            recv_w,
            topk_idx,
            counts,
            src_token,
            stats,
            num_experts,
            num_tokens,
            True,
            gid,
            r,
            24,
        ),
    )
    checked.append("combine")
    torch.library.opcheck(
        ops.cached_dispatch.default,
        (x, topk_idx, counts, src_token, stats, num_experts, gid, r, 24),
    )
    checked.append("cached_dispatch")
    torch.library.opcheck(ops.layout.default, (topk_idx, num_experts, world))
    checked.append("layout")
    return checked


@pytest.mark.parametrize("arena_mb", ["0", "4"], ids=["torch-outputs", "arena-outputs"])
def test_opcheck_custom_ops(arena_mb):
    """Also with the dispatch's recv_x in the buffer's output arena (torch_fused_a2a/_arena.py):
    a tensor of its own over arena memory, not a view, so the ops' checks hold alike."""
    env = {"FUSED_A2A_TORCH_ARENA_MB": arena_mb}
    (checked,) = run_ranks(_opcheck_all, 1, timeout=180, env=env)
    in_arena = ["recv_x in the arena"] if arena_mb != "0" else []
    assert checked == [
        "dispatch[C=6]",
        "dispatch[C=3]",
        "dispatch[C=-1]",
        *in_arena,
        "combine",
        "cached_dispatch",
        "layout",
    ]


def test_direct_route_only_in_plain_eager(monkeypatch):
    """_ops.run skips torch.library's layer only where nothing traces or needs autograd."""
    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode

    from torch_fused_a2a import _ops

    plain = torch.zeros(4, 8)
    assert _ops._direct((plain, None, 3))
    needs_grad = torch.zeros(4, 8, requires_grad=True)
    assert not _ops._direct((needs_grad,))
    with torch.no_grad():
        assert _ops._direct((needs_grad,))  # inside autograd.Function.forward / backward
    with FakeTensorMode():
        assert not _ops._direct((torch.zeros(4, 8),))
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert not _ops._direct((plain,))
    monkeypatch.undo()
    monkeypatch.setenv("FUSED_A2A_TORCH_DIRECT", "0")
    assert not _ops._direct((plain,))
