"""Normal mode on CUDA GPUs: the static dispatch and combine (torch, one process per GPU) with
large rows over one round and over many rounds of a small buffer (FUSED_A2A_BUFFER_ROWS=7),
capacity drops, and FP8 rows (e4m3 + 1x128 scales), under every variant of the static path
(STATIC_VARIANTS, FP8_VARIANTS), bit for bit against the NumPy reference. Split from
tests/test_gpu_normal.py, whose spawn helpers run each buffer size's variants in one spawn.

Skipped unless at least two CUDA GPUs are visible.
"""

from __future__ import annotations

import numpy as np
import pytest
import reference as R
from conftest import gpu_count
from mp import run_ranks
from reference import assert_bitwise_equal
from test_gpu_normal import GPU_ENV, META_VEC, NO_PUSH, PASS1, PUSH, _need, _variant_results

pytestmark = pytest.mark.gpu

# ----------------------------------------------------------------------------- torch: big rows


def _rank_static(rank, world, cases, group=None):
    """Static sizes through the custom ops: capacity drops, several rounds (small buffers)."""
    import torch
    import torch.distributed as dist
    from torch_utils import to_numpy

    import torch_fused_a2a as tfa

    group = group or dist.group.WORLD
    torch.cuda.set_device(rank)
    out = {}
    for name, (ns, h, k, e, cap, seed) in cases.items():
        rng = np.random.default_rng([seed, rank])
        n = ns[rank]
        x = torch.randn(n, h, device="cuda").to(torch.bfloat16)
        idx = (
            torch.stack([torch.randperm(e)[:k] for _ in range(n)]).cuda()
            if n
            else torch.empty(0, k, dtype=torch.int64, device="cuda")
        )
        idx[torch.from_numpy(rng.random((n, k)) < 0.1).cuda()] = -1
        w = torch.rand(n, k, device="cuda")
        buf = tfa.get_buffer(group, tfa.get_hidden_bytes(x), x.device)
        ops = torch.ops.fused_a2a
        rx, _, ridx, rw, counts, src, tpe, stats, _ = ops.dispatch(
            x, None, idx, w, e, buf.group_id, buf.rank, buf.num_ranks, cap, 0
        )
        y = (rx.float() * 0.5).to(rx.dtype)
        o, ow = ops.combine(
            y, w.new_ones(cap, k), idx, counts, src, stats, e, n, False, buf.group_id, buf.rank, 0
        )
        out[name] = dict(
            x=to_numpy(x),
            idx=to_numpy(idx),
            w=to_numpy(w),
            rx=to_numpy(rx),
            **_static_outputs(ridx, rw, tpe, stats),
            out=to_numpy(o),
            ow=to_numpy(ow),
        )
    return out


def _static_outputs(ridx, rw, tpe, stats):
    """A static dispatch's outputs that _check_static_dispatch reads, as NumPy arrays."""
    from torch_utils import to_numpy

    return dict(ridx=to_numpy(ridx), rw=to_numpy(rw), tpe=to_numpy(tpe), stats=to_numpy(stats))


def _check_static_dispatch(got, want, tag):
    """A static dispatch's indices, weights, tokens per expert and kept / dropped counts (one rank)
    against the reference's."""
    # in topk_idx's dtype (int64 here: the kernels write it, session 22)
    assert_bitwise_equal(got["ridx"], want["recv_topk_idx"].astype(got["idx"].dtype), f"{tag} idx")
    assert_bitwise_equal(got["rw"], want["recv_topk_weights"], f"{tag} w")
    assert_bitwise_equal(got["tpe"], want["tokens_per_expert"].astype(np.int32), f"{tag} tpe")
    assert list(got["stats"][:2]) == [want["num_kept"], want["num_dropped"]], tag


STATIC_CASES = {  # name: (N per rank, H, K, E, capacity, seed)
    "h7168_k8_exact": ((300, 257, 1, 300), 7168, 8, 64, 1200, 1),
    "h7168_k8_drop": ((300, 257, 1, 300), 7168, 8, 64, 350, 2),
    "h4096_k2_empty_rank": ((200, 0, 120, 64), 4096, 2, 32, 500, 3),
    # 128-byte rows in the buffer the 14 KB rows made: the dispatch's window is capped (run 63:
    # uncapped, 224-byte rows in a buffer of 8192 rows of 14 KB needed 259 KB of shared memory)
    "h64_k8_narrow_rows": ((300, 257, 1, 300), 64, 8, 64, 1200, 4),
    # above 1024 tokens the route scan runs in two passes over tiles of 512 tokens (3 here)
    "h256_k8_scan_tiles": ((1500, 1300, 1100, 1500), 256, 8, 64, 6000, 5),
    # 25-26 tiles of 512 tokens, more than the "fused_scan" kernel's 24 blocks (a block then
    # scans two tiles)
    "h64_k8_many_tiles": ((13000, 12500, 12300, 13000), 64, 8, 64, 52000, 6),
}


STATIC_VARIANTS = {  # the static paths besides the default (session 10; defaults since run 50)
    "default": {},
    "zero_first": {"FUSED_A2A_CUDA_ZERO": "first"},
    "layout_ready": {"FUSED_A2A_CUDA_LAYOUT": "ready"},
    "lean_end": {"FUSED_A2A_CUDA_CHUNK_END": "lean"},
    # own rows by the senders, so the receivers deal the remote sources only (session 11)
    "own_senders": {"FUSED_A2A_CUDA_SELF": "send"},
    # receiver items claimed; claimed by the senders too once their items are sent (session 11)
    "recv_claim": {"FUSED_A2A_CUDA_RECV_ITEMS": "claim", "FUSED_A2A_CUDA_SELF": "send"},
    "recv_help": {"FUSED_A2A_CUDA_RECV_ITEMS": "help"},
    # dispatch / combine launched while the route scan before them runs (session 11)
    "pdl": {"FUSED_A2A_CUDA_PDL": "1"},
    # the route scan's second pass in the static dispatch and the combine kernels (session 13;
    # the default above 1024 tokens since session 14), forced at every N
    "fused_scan": {"FUSED_A2A_CUDA_SCAN": "fused"},
    # the former default above 1024 tokens: the scan's two passes as two kernels
    "two_kernel_scan": {"FUSED_A2A_CUDA_SCAN": "tiles"},
    # the dispatch's chunks by SM count (session 23): up to 32 rows on 12 SMs, 16 on 16 SMs
    "sms12": {"FUSED_A2A_CUDA_BLOCKS": "12"},
    "sms16": {"FUSED_A2A_CUDA_BLOCKS": "16"},
    # the records' index and weight words as 16-byte vector loads (session 23), also at 12 SMs
    "meta_vec": META_VEC,
    "meta_vec_sms12": {**META_VEC, "FUSED_A2A_CUDA_BLOCKS": "12"},
    "meta_words": {**META_VEC, "FUSED_A2A_CUDA_META_VEC": "0"},
    # the route scan's first pass in the kernels too (session 25): above 1024 tokens, at every N,
    # and at 12 SMs (the 13,000-token ranks' 26 tiles over 12 blocks)
    "pass1": PASS1,
    "pass1_all": {**PASS1, "FUSED_A2A_CUDA_SCAN": "fused"},
    "pass1_sms12": {**PASS1, "FUSED_A2A_CUDA_BLOCKS": "12"},
    # receiver warps pushing rows beside the senders (session 25): 4 a block, all but one (12
    # asked) at 12 SMs (the 13,000-token ranks' many chunks), and with own rows by the receivers
    "recv_push": {**META_VEC, **PUSH},
    "recv_push_all_sms12": {
        **META_VEC,
        "FUSED_A2A_CUDA_RECV_PUSH": "12",
        "FUSED_A2A_CUDA_BLOCKS": "12",
    },
    "recv_push_own_recv": {**META_VEC, **PUSH, "FUSED_A2A_CUDA_SELF": "recv"},
    # no receiver warp pushing (the default before session 26): the receivers only receive
    "no_push": NO_PUSH,
}


@pytest.mark.parametrize("variant", list(STATIC_VARIANTS))
@pytest.mark.parametrize("rows", ["8192", "7"], ids=["one-round", "many-rounds"])
def test_static_big_rows(rows, variant):
    """Static dispatch and combine of 14 KB rows, incl. padding rows (capacity above the rows
    received) and dropped rows (capacity below), one round or many. The default zeroes the
    padding during the receivers' flag waits and has the senders place their rows from every
    rank's count row (no round-0 ready message); "zero_first": the padding zeroed before the
    receivers' first item (FUSED_A2A_CUDA_ZERO=first); "layout_ready": the senders wait for each
    receiver's ready message (FUSED_A2A_CUDA_LAYOUT=ready); "lean_end": a chunk's flag released
    once its own writes are complete (FUSED_A2A_CUDA_CHUNK_END=lean); "own_senders": the senders
    copy the own rows, so the receiver warps deal only the remote sources' chunks; "recv_claim":
    the receivers claim their items from a counter (over the rounds); "recv_help": the sender
    warps claim receiver items too once their own are sent (one-round ops); "pdl": the dispatch
    and combine kernels by programmatic dependent launch after the route scan; "fused_scan":
    the route scan's second pass in the dispatch and combine kernels at every N
    (FUSED_A2A_CUDA_SCAN=fused; by default only above 1024 tokens); "two_kernel_scan": the two
    passes as two kernels (FUSED_A2A_CUDA_SCAN=tiles); "sms12" / "sms16": 12 / 16 SMs, whose
    dispatch chunks are up to 32 / 16 rows; "meta_vec": the records' index and weight words
    through 16-byte loads with the fused scan at every N (the default above 1024 tokens since
    session 24; K = 8 here, K = 2 falls back); "meta_words": word by word, fused
    (FUSED_A2A_CUDA_META_VEC=0); "pass1*": the route scan's first pass in the kernels too
    (FUSED_A2A_CUDA_SCAN_PASS1=fused), with every tile's counts published by a flag;
    "recv_push*": receiver warps pushing rows with plain stores beside the senders' bulk copies
    in one-round ops, then claiming receiver items (FUSED_A2A_CUDA_RECV_PUSH; 4 a block by
    default since session 26, so the default too above 1024 tokens); "no_push": none pushing."""
    g = 4 if gpu_count() >= 4 else 2
    _need(g)
    cases = {k: ((v[0][:g],) + v[1:]) for k, v in STATIC_CASES.items()}
    res = _variant_results(_rank_static, g, rows, cases, STATIC_VARIANTS, variant)
    for name, (_, _h, k, e, cap, _) in cases.items():
        per = [res[r][name] for r in range(g)]
        xs = [p["x"] for p in per]
        disp = R.dispatch(xs, [p["idx"] for p in per], [p["w"] for p in per], e, capacity=cap)
        ys = [(d["recv_x"].astype(np.float32) * np.float32(0.5)).astype(R.BF16) for d in disp]
        outs, ows = R.combine(
            ys, disp, [x.shape[0] for x in xs], [np.ones((cap, k), np.float32)] * g
        )
        for r in range(g):
            tag = f"{name} rank {r} rows={rows}"
            assert_bitwise_equal(per[r]["rx"], disp[r]["recv_x"], f"{tag} recv_x")
            _check_static_dispatch(per[r], disp[r], tag)
            assert_bitwise_equal(per[r]["out"], outs[r], f"{tag} out")
            assert_bitwise_equal(per[r]["ow"], ows[r], f"{tag} out weights")
        if name.endswith("drop"):
            assert sum(d["num_dropped"] for d in disp) > 0


def _rank_fp8(rank, world, cases, group=None):
    """FP8 rows (e4m3 + 1x128 f32 scales, tests/reference.py's quantisation) through the static
    dispatch op: rows, scales, indices, weights and counts. Capacity -1: the dynamic dispatch,
    twice (the second call speculates on the first's N), the second's outputs and paths."""
    import torch
    import torch.distributed as dist
    from torch_utils import to_numpy

    import torch_fused_a2a as tfa
    from torch_fused_a2a import _ops

    group = group or dist.group.WORLD
    torch.cuda.set_device(rank)
    out = {}
    for name, (ns, h, k, e, cap, seed) in cases.items():
        rng = np.random.default_rng([seed, rank])
        n = ns[rank]
        xq, xs = R.fp8_quantize(rng.standard_normal((n, h)).astype(np.float32))
        x = torch.from_numpy(xq.view(np.uint8)).cuda().view(torch.float8_e4m3fn)
        scales = torch.from_numpy(xs).cuda()
        idx = np.array([rng.permutation(e)[:k] for _ in range(n)], np.int64).reshape(n, k)
        idx[rng.random((n, k)) < 0.1] = -1
        w = rng.random((n, k)).astype(np.float32)
        buf = tfa.get_buffer(group, tfa.get_hidden_bytes(x), x.device)
        args = (x, scales, torch.from_numpy(idx).cuda(), torch.from_numpy(w).cuda(), e)
        args += (buf.group_id, buf.rank, buf.num_ranks, cap, 0)
        paths = {}
        if (
            cap < 0
        ):  # dynamic: the first call (exact) sets the group's N seen, the second speculates
            torch.ops.fused_a2a.dispatch(*args)
            before = dict(_ops.DYNAMIC_PATHS)
        rx, rsc, ridx, rw, _, _, tpe, stats, _ = torch.ops.fused_a2a.dispatch(*args)
        if cap < 0:
            paths = {k: v - before[k] for k, v in _ops.DYNAMIC_PATHS.items() if v != before[k]}
        out[name] = dict(
            xq=xq.view(np.uint8),
            xs=xs,
            idx=idx,
            w=w,
            rx=to_numpy(rx.view(torch.uint8)),
            rsc=to_numpy(rsc),
            paths=paths,
            **_static_outputs(ridx, rw, tpe, stats),
        )
    return out


FP8_CASES = {  # name: (N per rank, H, K, E, capacity, seed); N > 512: senders copy own rows
    "fp8_h7168_k8": ((700, 513, 3, 650), 7168, 8, 64, 2400, 11),
    "fp8_h1024_k4_drop": ((600, 40, 0, 700), 1024, 4, 32, 500, 12),
}


FP8_VARIANTS = {  # the FP8 static dispatch's paths (parameter "own" of test_static_fp8_rows)
    "default": {},
    "recv": {"FUSED_A2A_CUDA_SELF": "recv"},
    "split": {"FUSED_A2A_CUDA_SELF": "split"},
    "loads_ahead2": {"FUSED_A2A_CUDA_LOADS_AHEAD": "2"},
    "records": {"FUSED_A2A_CUDA_RECORDS": "1", "FUSED_A2A_CUDA_SCAN": "tiles"},
    "no_records": {"FUSED_A2A_CUDA_RECORDS": "0"},
    # the route scan's second pass in the kernel without records (FP8 rows through the static
    # speculative path of session 21, removed after run 117; still a valid setting)
    "fused_no_records": {"FUSED_A2A_CUDA_RECORDS": "0", "FUSED_A2A_CUDA_SCAN": "fused"},
    # padding rows zeroed before the receivers' first item
    "zero_first": {"FUSED_A2A_CUDA_ZERO": "first"},
    "ready": {"FUSED_A2A_CUDA_LAYOUT": "ready"},  # a round-0 ready message from each receiver
    # the senders claim receiver items once their own are sent
    "help": {"FUSED_A2A_CUDA_RECV_ITEMS": "help"},
    # 32-row chunks (12 SMs, session 23): the largest metadata staging of FP8 records
    "sms12": {"FUSED_A2A_CUDA_BLOCKS": "12"},
    # vector loads of the index and weight words beside the vector scale loads (session 23)
    "meta_vec": {**META_VEC, "FUSED_A2A_CUDA_RECORDS": "0"},
    # the records kernel's words one by one (FUSED_A2A_CUDA_META_VEC=0; the default before
    # session 24)
    "meta_words_records": {"FUSED_A2A_CUDA_META_VEC": "0", "FUSED_A2A_CUDA_RECORDS": "1"},
    # the route scan's first pass in the kernel (session 25), without records
    "pass1": {**PASS1, "FUSED_A2A_CUDA_RECORDS": "0", "FUSED_A2A_CUDA_SCAN": "fused"},
    # receiver warps pushing FP8 rows and their scales' records (session 25), without records
    "recv_push": {**META_VEC, **PUSH, "FUSED_A2A_CUDA_RECORDS": "0"},
    # no receiver warp pushing, so the records kernel above 512 tokens (the default before
    # session 26)
    "no_push": NO_PUSH,
}


@pytest.mark.parametrize("own", list(FP8_VARIANTS))
@pytest.mark.parametrize("rows", ["8192", "7"], ids=["one-round", "many-rounds"])
def test_static_fp8_rows(rows, own):
    """Issue 7's FP8 dispatch: the senders' batched records (16-byte scale loads) and own rows
    ("recv" / "split": who copies them, FUSED_A2A_CUDA_SELF); "loads_ahead2": the senders' rings
    (7 stages of 7 KB FP8 rows) with 2 loads and up to 5 stores in flight
    (FUSED_A2A_CUDA_LOADS_AHEAD); "records": the records precomputed by their own kernel on every
    rank (FUSED_A2A_CUDA_RECORDS=1; by default on the ranks with over 512 tokens when no receiver
    warps push, "no_push"), pushed as bulk
    pieces and read by the own rows' scatter, with the two-pass route scan; "no_records": computed
    by the senders on every rank (FUSED_A2A_CUDA_RECORDS=0)."""
    g = 4 if gpu_count() >= 4 else 2
    _need(g)
    cases = {k: ((v[0][:g],) + v[1:]) for k, v in FP8_CASES.items()}
    res = _variant_results(_rank_fp8, g, rows, cases, FP8_VARIANTS, own)
    _check_fp8(res, g, cases, f"rows={rows} own={own}")


def _check_fp8(res, g, cases, label):
    """_rank_fp8's results against the reference (capacity -1: the exact size)."""
    e4m3 = np.dtype(R.E4M3)
    for name, (_, _h, _k, e, cap, _) in cases.items():
        per = [res[r][name] for r in range(g)]
        xs = [(p["xq"].view(e4m3), p["xs"]) for p in per]
        disp = R.dispatch(
            xs,
            [p["idx"] for p in per],
            [p["w"] for p in per],
            e,
            capacity=cap if cap >= 0 else None,
        )
        for r in range(g):
            tag = f"{name} rank {r} {label}"
            rx, rsc = disp[r]["recv_x"]
            assert_bitwise_equal(per[r]["rx"], rx.view(np.uint8), f"{tag} recv_x")
            assert_bitwise_equal(per[r]["rsc"], rsc, f"{tag} recv scales")
            _check_static_dispatch(per[r], disp[r], tag)
        if name.endswith("drop"):
            assert sum(d["num_dropped"] for d in disp) > 0


FP8_DYNAMIC_CASES = {  # as FP8_CASES, capacity -1 (the dynamic dispatch's exact size)
    "fp8_h7168_k8_dynamic": ((700, 513, 3, 650), 7168, 8, 64, -1, 13),
    "fp8_h1024_k4_dynamic_small": ((60, 40, 0, 70), 1024, 4, 32, -1, 14),
}


@pytest.mark.parametrize("speculative", ["static", "two_kernels", "no_push"])
def test_dynamic_fp8_rows(speculative):
    """FP8 rows through torch's dynamic dispatch (Megatron's route, capacity -1), its second call
    speculative: by default through the static kernel, which writes the host counts
    (_ops._speculative_static: FP8 rows too since session 29, as their static dispatch runs
    without records); "two_kernels": dispatch_notify + dispatch_data
    (FUSED_A2A_TORCH_SPECULATIVE=two_kernels); "no_push": no receiver warps pushing, so FP8
    rows want the records kernel and keep the two kernels."""
    g = 4 if gpu_count() >= 4 else 2
    _need(g)
    env = dict(GPU_ENV)
    if speculative == "two_kernels":
        env["FUSED_A2A_TORCH_SPECULATIVE"] = "two_kernels"
    elif speculative == "no_push":
        env.update(NO_PUSH)
    cases = {k: ((v[0][:g],) + v[1:]) for k, v in FP8_DYNAMIC_CASES.items()}
    res = run_ranks(_rank_fp8, g, cases, timeout=300, env=env)
    _check_fp8(res, g, cases, f"speculative={speculative}")
    one_kernel = speculative == "static"
    for r in range(g):
        for name in cases:
            want = {"speculative": 1, "one_kernel": 1} if one_kernel else {"speculative": 1}
            assert res[r][name]["paths"] == want, (r, name, res[r][name]["paths"])
