"""Smoke test of the CUDA backend through the core module alone, one process driving G GPUs.

    python -X faulthandler benchmarks/smoke_gpu.py [G]

Prints every step (so a crash shows where it happened): buffer creation and connection, layout,
static dispatch + combine on all ranks (asynchronous launches, then a sync), the dynamic path
(dispatch_notify needs every rank at once: one thread per rank), and checks the results exactly
against a host computation.
"""

from __future__ import annotations

import sys
import threading

import numpy as np
import torch

import fused_a2a_core as core


def say(*a):
    print(*a, flush=True)


def main():
    g = int(sys.argv[1]) if len(sys.argv) > 1 else torch.cuda.device_count()
    say("build", core.build_info(), "devices", core.cuda_device_count())
    n, h, k, e = 64, 1024, 4, 8 * g
    gid = 0x5A5A
    nbytes = core.recommended_buffer_bytes(h * 2, g, 1, 256)
    infos = [core.buffer_create(gid, r, g, nbytes, 1, r) for r in range(g)]
    say("created", nbytes, [len(i) for i in infos])
    for r in range(g):
        core.buffer_connect(gid, r, infos)
    for r in range(g):
        core.buffer_seal(gid, r)
    say("connected")
    gen = torch.Generator().manual_seed(0)
    xs, idxs = [], []
    for r in range(g):
        xs.append(torch.randn(n, h, generator=gen).to(torch.bfloat16).cuda(r))
        idx = torch.argsort(torch.rand(n, e, generator=gen), 1)[:, :k]
        idx[torch.rand(n, k, generator=gen) < 0.2] = -1
        idxs.append(idx.cuda(r))
    # layout
    for r in range(g):
        with torch.cuda.device(r):
            per_rank = torch.zeros(g, dtype=torch.int32, device=r)
            per_exp = torch.zeros(e, dtype=torch.int32, device=r)
            in_rank = torch.zeros(n, g, dtype=torch.uint8, device=r)
            core.layout(
                1,
                torch.cuda.current_stream(r).cuda_stream,
                idxs[r].data_ptr(),
                5,
                n,
                k,
                e,
                g,
                per_rank.data_ptr(),
                per_exp.data_ptr(),
                in_rank.data_ptr(),
            )
            torch.cuda.synchronize(r)
            owners = torch.where(idxs[r] >= 0, idxs[r] // (e // g), -1).cpu()
            exp = torch.stack([(owners == d).any(1) for d in range(g)], 1)
            assert torch.equal(in_rank.cpu().bool(), exp), "layout is_token_in_rank"
            assert torch.equal(per_rank.cpu(), exp.sum(0).int()), "layout per rank"
    say("layout ok")

    cap = g * n
    outs = []
    for r in range(g):
        dev = torch.device("cuda", r)
        o = dict(
            recv_x=torch.empty(cap, h, dtype=torch.bfloat16, device=dev),
            recv_idx=torch.empty(cap, k, dtype=torch.int32, device=dev),
            counts=torch.zeros(g, dtype=torch.int32, device=dev),
            src=torch.empty(cap + 1, dtype=torch.int32, device=dev),
            tpe=torch.zeros(e // g, dtype=torch.int32, device=dev),
            stats=torch.zeros(3, dtype=torch.int32, device=dev),
        )
        a = core.DispatchArgs()
        a.x, a.x_dtype, a.num_tokens, a.hidden = xs[r].data_ptr(), 2, n, h
        a.topk_idx, a.idx_dtype, a.num_topk, a.num_experts = idxs[r].data_ptr(), 5, k, e
        a.capacity, a.recv_x, a.recv_topk_idx = (
            cap,
            o["recv_x"].data_ptr(),
            o["recv_idx"].data_ptr(),
        )
        a.recv_src_counts, a.recv_src_token = o["counts"].data_ptr(), o["src"].data_ptr()
        a.tokens_per_expert = o["tpe"].data_ptr()
        a.num_recv, a.num_dropped = o["stats"].data_ptr(), o["stats"].data_ptr() + 4
        a.group_max_tokens = o["stats"].data_ptr() + 8
        o["args"] = a
        outs.append(o)
    for r in range(g):
        core.dispatch(gid, r, torch.cuda.current_stream(r).cuda_stream, outs[r]["args"])
        say("dispatch launched on rank", r)
    for r in range(g):
        torch.cuda.synchronize(r)
    say("dispatch done", [o["stats"].tolist() for o in outs])
    for r in range(g):
        m = int(outs[r]["stats"][0])
        src = outs[r]["src"][:m].cpu()
        counts = outs[r]["counts"].cpu().tolist()
        rows = outs[r]["recv_x"][:m].cpu().view(torch.int16)
        start = 0
        for s in range(g):
            owners = torch.where(idxs[s] >= 0, idxs[s] // (e // g), -1).cpu()
            toks = torch.nonzero((owners == r).any(1)).flatten()
            assert counts[s] == len(toks), (r, s, counts[s], len(toks))
            assert torch.equal(src[start : start + counts[s]], toks.int()), ("src", r, s)
            exp = xs[s].cpu()[toks].view(torch.int16)
            assert torch.equal(rows[start : start + counts[s]], exp), ("rows", r, s)
            start += counts[s]
    say("dispatch ok")

    combined = []
    for r in range(g):
        o = outs[r]
        out = torch.empty(n, h, dtype=torch.bfloat16, device=r)
        c = core.CombineArgs()
        c.y, c.y_dtype, c.num_rows, c.hidden = o["recv_x"].data_ptr(), 2, cap, h
        c.num_topk = k
        c.recv_src_counts, c.recv_src_token = o["counts"].data_ptr(), o["src"].data_ptr()
        c.group_max_tokens = o["stats"].data_ptr() + 8
        c.topk_idx, c.idx_dtype, c.num_experts = idxs[r].data_ptr(), 5, e
        c.num_tokens, c.out = n, out.data_ptr()
        core.combine(gid, r, torch.cuda.current_stream(r).cuda_stream, c)
        combined.append(out)
    for r in range(g):
        torch.cuda.synchronize(r)
    for r in range(g):
        owners = torch.where(idxs[r] >= 0, idxs[r] // (e // g), -1)
        cnt = torch.stack([(owners == d).any(1) for d in range(g)], 1).sum(1).float()
        exp = ((xs[r].float() * cnt[:, None]) + 0.0).to(torch.bfloat16)
        assert torch.equal(combined[r].view(torch.int16), exp.view(torch.int16)), ("combine", r)
    say("combine ok")

    errs = []

    def notify(r):
        try:
            core.dispatch_notify(gid, r, torch.cuda.current_stream(r).cuda_stream, outs[r]["args"])
        except Exception as exc:  # noqa: BLE001
            errs.append(exc)

    threads = [threading.Thread(target=notify, args=(r,)) for r in range(g)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errs, errs
    say("notify ok", [o["stats"].tolist() for o in outs])
    core.buffer_release(gid)
    say("SMOKE OK")
    return 0


if __name__ == "__main__":
    np.set_printoptions(linewidth=150)
    sys.exit(main())
