"""Normal-mode benchmark on the GPUs of one host (torch frontend, one process per GPU, NCCL).

    python benchmarks/bench_normal.py --world 4 --out results.json [--cases standard,decode,...]

Per case (BENCHMARKS.md): N tokens per rank, H, top-K of E experts routed from uniform random
scores, bf16 rows, f32 weights. Times the static dispatch (count exchange + rows, one collective
call), the cached dispatch (rows only, as DeepEP's tuned figure), the dynamic dispatch (count
exchange, host sync, rows), combine, and NCCL all_to_all_single of the same rows, in the same
processes. Each op: CUDA events around every call, median of `iters` calls after warm-up, and the
same ops replayed from a CUDA graph (per-op time = replay time / ops per graph); the slowest rank
counts. Metrics: DeepEP's (bytes of recv_x incl. own tokens / time), wire (remote rows' bytes /
time), SMs.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch
import torch.distributed as dist
from _spawn import init_rank, spawn_ranks


def _case(n=4096, sms=24, fp8=False, worst_cap=False, **env):
    """The standard case's shape (H=7168, top-8 of 256) with N tokens, sms SMs and env knobs
    (keyword names without the FUSED_A2A_CUDA_ prefix). fp8: the dispatches send e4m3 rows with
    one f32 scale per 128 values (DeepEP's FP8 dispatch; the combine has no FP8 form, so those
    cases time the dispatches and NCCL only). worst_cap: the static dispatch's capacity is
    world x N rows, as the JAX frontend's (the rows past those received are zeroed), instead of
    the rows received."""
    case = dict(n=n, h=7168, k=8, e=256, sms=sms)
    if fp8:
        case["fp8"] = True
    if worst_cap:
        case["worst_cap"] = True
    if env:
        case["env"] = {"FUSED_A2A_CUDA_" + key: value for key, value in env.items()}
    return case


CASES = {  # name: dict(n, h, k, e, sms, env knobs)
    "standard": _case(),
    "standard_sms12": _case(sms=12),
    "standard_sms16": _case(sms=16),
    "standard_sms32": _case(sms=32),
    "standard_sms48": _case(sms=48),
    "standard_sms64": _case(sms=64),
    "standard_sms40": _case(sms=40),
    "decode_sms48": _case(n=128, sms=48),
    "standard_u16": _case(RECV_UNROLL="16"),
    "standard_sms48_u16": _case(sms=48, RECV_UNROLL="16"),
    "standard_selfrecv_u16": _case(SELF="recv", RECV_UNROLL="16"),
    "standard_claim": _case(CLAIM="1"),
    "standard_dealt": _case(CLAIM="0"),
    "standard_claim_selfrecv": _case(CLAIM="1", SELF="recv"),
    "standard_sms48_dealt": _case(sms=48, CLAIM="0"),
    "decode_claim": _case(n=128, CLAIM="1"),
    "decode_dealt": _case(n=128, CLAIM="0"),
    "standard_cclaim": _case(COMBINE_CLAIM="1"),
    "decode_cclaim": _case(n=128, COMBINE_CLAIM="1"),
    "standard_cdealt": _case(COMBINE_CLAIM="0"),  # the combine's default is claiming (session 8)
    "decode_cdealt": _case(n=128, COMBINE_CLAIM="0"),
    "standard_fp8": _case(fp8=True),  # issue 7: FP8 dispatch >= 1.25x DeepEP's FP8 figure
    "decode_fp8": _case(n=128, fp8=True),
    # Issue 7's FP8 and EP 2 targets and issue 4's dispatch have no SM bound (session 11)
    "standard_fp8_sms32": _case(fp8=True, sms=32),
    "standard_fp8_sms48": _case(fp8=True, sms=48),
    "standard_fp8_sms64": _case(fp8=True, sms=64),
    # FP8 gains with every SM added (run 52: 406 us at 24 SMs, 353 at 64), so its senders are
    # bound per warp: more sender warps of the same 24 SMs (the rings shrink to fit)
    "standard_fp8_s6": _case(fp8=True, SEND_WARPS="6", RECV_WARPS="10"),
    "standard_fp8_s8": _case(fp8=True, SEND_WARPS="8", RECV_WARPS="8"),
    # The receivers bound those (runs 53, 55: 8 FP8 sender warps finish at ~280 us, the receivers
    # at ~450): 16 loads in flight per lane of their copy instead of 8 (the RECV_UNROLL=16 kernel)
    "standard_fp8_u16": _case(fp8=True, RECV_UNROLL="16"),
    "standard_fp8_s6_u16": _case(fp8=True, SEND_WARPS="6", RECV_WARPS="10", RECV_UNROLL="16"),
    "standard_fp8_s8_u16": _case(fp8=True, SEND_WARPS="8", RECV_WARPS="8", RECV_UNROLL="16"),
    "standard_fp8_sms64_u16": _case(fp8=True, sms=64, RECV_UNROLL="16"),
    "standard_sms32_u16": _case(sms=32, RECV_UNROLL="16"),
    "standard_sms64_u16": _case(sms=64, RECV_UNROLL="16"),
    # Receiver items claimed from a counter (RECV_ITEMS=claim), and claimed by the sender warps
    # too once their own items are sent (=help), session 11
    "standard_rclaim": _case(RECV_ITEMS="claim"),
    "standard_rhelp": _case(RECV_ITEMS="help"),
    "standard_sms48_rhelp": _case(sms=48, RECV_ITEMS="help"),
    "standard_sms48_rhelp_u16": _case(sms=48, RECV_ITEMS="help", RECV_UNROLL="16"),
    "standard_fp8_rhelp": _case(fp8=True, RECV_ITEMS="help"),
    "standard_fp8_s8_rhelp": _case(fp8=True, SEND_WARPS="8", RECV_WARPS="8", RECV_ITEMS="help"),
    "standard_fp8_s8_rhelp_u16": _case(
        fp8=True, SEND_WARPS="8", RECV_WARPS="8", RECV_ITEMS="help", RECV_UNROLL="16"
    ),
    "decode_rhelp": _case(n=128, RECV_ITEMS="help"),
    "standard_sms48_rhelp_pdl": _case(sms=48, RECV_ITEMS="help", PDL="1"),
    # The dynamic dispatch scanning the routing again after the host sync (the former path; since
    # session 11 dispatch_data reuses dispatch_notify's scan): compare dynamic_dispatch_us
    "standard_rescan": _case(RESCAN="1"),
    "decode_rescan": _case(n=128, RESCAN="1"),
    # Dispatch and combine launched while the route scan before them runs (PDL=1, session 11)
    "standard_pdl": _case(PDL="1"),
    "decode_pdl": _case(n=128, PDL="1"),
    "standard_simt": _case(COPY="simt"),
    # Who copies the own rows: the receiver warps or the senders (default: receivers up to 512
    # tokens, senders above; runs 18-20)
    "standard_selfrecv": _case(SELF="recv"),
    "standard_selfsend": _case(SELF="send"),
    "standard_selfsplit": _case(SELF="split"),
    # Chunk rows and the flag fence (run 3: chunk flags cost more than rows)
    "standard_cr8": _case(CHUNK_ROWS="8"),
    "standard_cr16": _case(CHUNK_ROWS="16"),
    "standard_cr32": _case(CHUNK_ROWS="32"),
    "standard_cr4": _case(CHUNK_ROWS="4"),
    "decode_cr32": _case(n=128, CHUNK_ROWS="32"),
    "standard_release": _case(FLAG_FENCE="release"),
    "standard_cr32_release": _case(CHUNK_ROWS="32", FLAG_FENCE="release"),
    "decode": _case(n=128),
    "decode_selfrecv": _case(n=128, SELF="recv"),
    "decode_selfsend": _case(n=128, SELF="send"),
    "n1024_selfrecv": _case(n=1024, SELF="recv"),
    "n1024_selfsend": _case(n=1024, SELF="send"),
    "n1024_selfsplit": _case(n=1024, SELF="split"),
    # Fewer receiver warps polling chunk flags (session 4: is the senders' untraced time the
    # pollers' contention?)
    "decode_r4": _case(n=128, SEND_WARPS="4", RECV_WARPS="4"),
    "standard_r4": _case(SEND_WARPS="4", RECV_WARPS="4"),
    # Ablations (build with -DFA2A_CUDA_ABLATE=1; wrong results): receivers copy nothing (1),
    # senders stage tokens only (2), senders push no rows (4)
    "standard_abl_recv": _case(ABLATE="1"),
    "standard_abl_meta": _case(ABLATE="2"),
    "standard_abl_rows": _case(ABLATE="4"),
    "standard_abl_recv_meta": _case(ABLATE="3"),
    "standard_abl_all": _case(ABLATE="7"),
    "standard_abl_roles": _case(ABLATE="8"),
    "decode_abl_roles": _case(n=128, ABLATE="8"),
    "decode_chunk2": _case(n=128, CHUNK_ROWS="2"),
}
# Help at more SMs (run 56: 48 SMs 544.5 us with help, 584.4 without; 24 SMs unchanged)
for _sms in (32, 40, 64, 80):
    CASES[f"standard_sms{_sms}_rhelp"] = _case(sms=_sms, RECV_ITEMS="help")
for _sms in (48, 64):
    CASES[f"standard_fp8_sms{_sms}_rhelp"] = _case(fp8=True, sms=_sms, RECV_ITEMS="help")
CASES["standard_sms32_pdl"] = _case(sms=32, PDL="1")
# Session 12: the dynamic dispatch queues its data kernel before the host has the counts
# (torch_fused_a2a/_ops.py, _dispatch_body); _exact: the host waits first (the former path), and
# _nopdl: the combine without programmatic dependent launch (the former default)
for _name in ("standard", "decode", "standard_sms48"):
    CASES[_name + "_exact"] = dict(CASES[_name], env={"FUSED_A2A_TORCH_SPECULATIVE_MB": "0"})
CASES["standard_nopdl"] = _case(PDL="0")
# N = 8192 at EP 4 (run 60: dispatch 1668 us against NCCL 1034, combine 1086 against 1022): a
# stream then needs two rounds of the buffer's 4096 rows per peer. _rows8192: one round (the
# buffer grows and never shrinks, so run this case after the others)
CASES["n8192_rows8192"] = dict(_case(n=8192), env={"FUSED_A2A_BUFFER_ROWS": "8192"})
CASES["n8192_sms48_rows8192"] = dict(_case(n=8192, sms=48), env={"FUSED_A2A_BUFFER_ROWS": "8192"})
CASES["decode_nopdl"] = _case(n=128, PDL="0")
# Session 13: the 48-SM dispatch (help by default there) is link-bound in its senders' loop
# (~333 GB/s wire against the probe's ~345) while its receivers wait on flags ~60% of theirs:
# who copies the own rows (the senders' pipes carry them above 512 tokens), chunk and slice
# sizes, and PDL, at 48 SMs (also the EP 2 cases: there the own rows are half of all rows)
for _name, _env in (
    ("selfrecv", dict(SELF="recv")),
    ("selfsplit", dict(SELF="split")),
    ("cr16", dict(CHUNK_ROWS="16")),
    ("rr1", dict(RECV_ROWS="1")),
    ("rr4", dict(RECV_ROWS="4")),
    ("pdl", dict(PDL="1")),
):
    CASES[f"standard_sms48_{_name}"] = _case(sms=48, **_env)
# Session 13: one chunk a sender warp at small N (FUSED_A2A_CUDA_CHUNKS_PER_WARP=1; default 2):
# run 39's decode trace has each sender warp end ~2 chunks of 2 rows, each end waiting for its
# writes to complete on the peer (chunk end 18.8K + final drain 13.9K of its 47.6K cycles)
for _name, _base in (("decode", dict(n=128)), ("n512", dict(n=512)), ("n1024", dict(n=1024))):
    CASES[_name + "_cpw1"] = _case(**_base, CHUNKS_PER_WARP="1")
    CASES.setdefault(_name, _case(**_base))
CASES["standard_cpw1"] = _case(CHUNKS_PER_WARP="1")
CASES["decode_cpw3"] = _case(n=128, CHUNKS_PER_WARP="3")
CASES["decode_cpw2"] = _case(n=128, CHUNKS_PER_WARP="2")  # the former default (runs 65-66)
# Small N: fewer blocks (the skeleton, launch + count exchange + epilogue, is 22 us of decode's
# ~67 in graphs, run 65), and PDL for the dispatch (runs 56-57: decode -2.5 / -3.4 us in graphs)
for _sms in (8, 12, 16):
    CASES[f"decode_sms{_sms}"] = _case(n=128, sms=_sms)
for _name, _base in (("n512", dict(n=512)), ("n1024", dict(n=1024))):
    CASES[_name + "_pdl"] = _case(**_base, PDL="1")
# The route scan's second pass in the static dispatch kernel (FUSED_A2A_CUDA_SCAN=fused, session
# 13): the route_list kernel (~4.5 us, run 65) gone, the pass overlapping the count exchange.
# Forced at every N; since session 14 it is the default above 1024 tokens, so there these cases
# time the default (the former path: FUSED_A2A_CUDA_SCAN=tiles)
for _name, _base in (
    ("standard", {}),
    ("standard_sms48", dict(sms=48)),
    ("decode", dict(n=128)),
    ("n8192", dict(n=8192)),
):
    CASES[_name + "_fscan"] = _case(**_base, SCAN="fused")
CASES["standard_fscan_pdl"] = _case(SCAN="fused", PDL="1")
# The dynamic dispatch's data kernel without its ready round trip: dispatch_notify publishes
# every rank's layout (FUSED_A2A_CUDA_LAYOUT=dynamic, session 13; the dynamic_dispatch row)
for _name, _base in (("standard", {}), ("standard_sms48", dict(sms=48)), ("decode", dict(n=128))):
    CASES[_name + "_laydyn"] = _case(**_base, LAYOUT="dynamic")
# Torch's speculative dynamic dispatch through dispatch_notify + the data kernel
# (FUSED_A2A_TORCH_SPECULATIVE=two_kernels), the default before session 17 (the static kernel
# with its count exchange inside since): the dynamic_dispatch row, against the same case
for _name in ("standard", "standard_sms48", "decode"):
    CASES[_name + "_spec2"] = dict(CASES[_name], env={"FUSED_A2A_TORCH_SPECULATIVE": "two_kernels"})
# FP8 at 48 SMs: no PDL for the dispatch after the records kernel by default (session 13), and
# with it (PDL=1)
CASES["standard_fp8_sms48"] = _case(fp8=True, sms=48)
CASES["standard_fp8_sms48_pdl"] = _case(fp8=True, sms=48, PDL="1")
# PDL for the dispatch from 48 blocks since session 13: the former default at 48 SMs
CASES["standard_sms48_pdlcombine"] = _case(sms=48, PDL="combine")
# Issue 7 bounds the SMs at 24, where the senders finish last (run 55's traces) and help gains
# nothing with 4 sender warps: more sender warps per block, the receivers helped (6 / 8 of 16
# warps sending; without help run 53's FP8 lost to the receivers at 6 / 8)
for _s in (6, 8):
    CASES[f"standard_s{_s}_rhelp"] = _case(
        SEND_WARPS=str(_s), RECV_WARPS=str(16 - _s), RECV_ITEMS="help"
    )
    CASES[f"standard_fp8_s{_s}_rhelp_sms48"] = _case(
        fp8=True, sms=48, SEND_WARPS=str(_s), RECV_WARPS=str(16 - _s), RECV_ITEMS="help"
    )
for _name in ("standard", "standard_sms12", "decode"):
    CASES[_name + "_dst"] = dict(CASES[_name], env={"FUSED_A2A_CUDA_ORDER": "dst"})
for _n in (128, 512, 1024, 2048, 4096, 8192):
    CASES[f"sweep_n{_n}"] = _case(n=_n)
for _sw, _rw, _kb, _cr in (
    (2, 14, 0, 8),
    (6, 10, 0, 8),
    (4, 12, 7, 8),
    (4, 12, 0, 16),
    (8, 8, 7, 8),
):
    CASES[f"tune_s{_sw}_r{_rw}_kb{_kb}_cr{_cr}"] = _case(
        SEND_WARPS=str(_sw), RECV_WARPS=str(_rw), STAGE_KB=str(_kb), CHUNK_ROWS=str(_cr)
    )
# Loads ahead of the stores in the senders' bulk-copy rings (FUSED_A2A_CUDA_LOADS_AHEAD, session 9):
# FP8 rows (7 KB, 7 stages a warp) keep 5 loads and 2 stores in flight by default, half the
# store bytes of bf16 rows (14 KB, 3 stages); 7 KB stages for bf16 likewise (run 34: 593 vs 582 us).
for _a in (1, 2, 3):
    CASES[f"standard_fp8_a{_a}"] = _case(fp8=True, LOADS_AHEAD=str(_a))
    CASES[f"standard_kb7_a{_a}"] = _case(STAGE_KB="7", LOADS_AHEAD=str(_a))
CASES["standard_kb7"] = _case(STAGE_KB="7")
# The receivers copy a chunk in row slices, several warps a chunk (FUSED_A2A_CUDA_RECV_ROWS,
# session 9): the copy after the last flag was one warp's (run 41: 33-48 us a chunk).
for _rr in (1, 2, 4):
    CASES[f"standard_rr{_rr}"] = _case(RECV_ROWS=str(_rr))
CASES["decode_rr1"] = _case(n=128, RECV_ROWS="1")
# Session 10: the route scan in one block per destination (the scan before session 10) against
# the two-pass default; the metadata records precomputed by their own kernel (RECORDS=1); the
# JAX frontend's capacity (world x N rows, the padding zeroed by the receivers).
for _name, _base in (("standard", {}), ("decode", dict(n=128)), ("standard_fp8", dict(fp8=True))):
    CASES[_name + "_scanblock"] = _case(**_base, SCAN="block")
    CASES[_name + "_rec"] = _case(**_base, RECORDS="1")
CASES["standard_rec_rr2"] = _case(RECORDS="1", RECV_ROWS="2")
CASES["standard_worstcap"] = _case(worst_cap=True)
# The defaults chosen after session 10's runs, against the former ones: receiver items of whole
# chunks (RECV_ROWS=0), FP8 records computed by the senders (RECORDS=0), the two-pass scan at
# N = 128 (SCAN=tiles).
CASES["standard_rr0"] = _case(RECV_ROWS="0")
CASES["standard_fp8_rec0"] = _case(fp8=True, RECORDS="0")
CASES["decode_scantiles"] = _case(n=128, SCAN="tiles")
# Session 10's paths, defaults since run 50, against the former ones: the padding rows zeroed
# before the receivers' first item (ZERO=first; default: during their flag waits), and the static
# dispatch with a round-0 ready message from each receiver (LAYOUT=ready; default: none, every
# rank's count row goes to every rank).
CASES["standard_worstcap_zf"] = _case(worst_cap=True, ZERO="first")
CASES["decode_worstcap"] = _case(n=128, worst_cap=True)
CASES["decode_worstcap_zf"] = _case(n=128, worst_cap=True, ZERO="first")
CASES["standard_ready"] = _case(LAYOUT="ready")
CASES["decode_ready"] = _case(n=128, LAYOUT="ready")
CASES["standard_fp8_ready"] = _case(fp8=True, LAYOUT="ready")
# Receiver items with an empty own column (the deal before session 11, RECV_COLS=all): with the
# own rows copied by the senders (N > 512) it idled a quarter of the receiver warps at EP 4.
CASES["standard_rcall"] = _case(RECV_COLS="all")
CASES["standard_fp8_rcall"] = _case(fp8=True, RECV_COLS="all")
# A chunk's flag released once its own writes are complete (FUSED_A2A_CUDA_CHUNK_END=lean)
CASES["decode_lean"] = _case(n=128, CHUNK_END="lean")
CASES["standard_lean"] = _case(CHUNK_END="lean")
# The FUSED_A2A_CUDA_* variables as the bench was started: each case starts from them and sets its
# own knobs on top, so one case's knobs never leak into the next (before session 8 a fixed list
# missed RECV_UNROLL, CLAIM and COMBINE_CLAIM, which then stayed set for the later cases).
_KNOB_PREFIXES = ("FUSED_A2A_CUDA_", "FUSED_A2A_TORCH_", "FUSED_A2A_BUFFER_")
BASE_KNOBS = {key: value for key, value in os.environ.items() if key.startswith(_KNOB_PREFIXES)}


def _set_case_env(env: dict) -> None:
    for key in [key for key in os.environ if key.startswith(_KNOB_PREFIXES)]:
        del os.environ[key]
    os.environ.update(BASE_KNOBS)
    os.environ.update(env)


def _events_median(fn, iters, warmup):
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    dist.barrier()
    evs = [
        (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
        for _ in range(iters)
    ]
    for start, stop in evs:
        start.record()
        fn()
        stop.record()
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) * 1e3 for s, e in evs)


def _graph_time(fn, reps, replays):
    """Per-op time of `reps` back-to-back calls captured in one CUDA graph (median replay)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(reps):
            fn()
    graph.replay()
    torch.cuda.synchronize()
    dist.barrier()
    times = []
    for _ in range(replays):
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        stop.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(stop) * 1e3 / reps)
        dist.barrier()
    del graph
    return statistics.median(times)


def _block_amax(x):
    """[N, H / 128] f32: the largest magnitude of each 128-value block of each row (the FP8
    cases' scales: a function of the row, so a receiver can recompute them)."""
    return x.float().view(x.shape[0], -1, 128).abs().amax(-1)


def _routing(n, e, k, rank, device):
    gen = torch.Generator(device=device).manual_seed(1000 + rank)
    scores = torch.rand(n, e, device=device, generator=gen)
    idx = torch.topk(scores, k, dim=1).indices.to(torch.int64)
    w = torch.rand(n, k, device=device, generator=gen)
    return idx, w


def _run_case(name, cfg, rank, world, iters, warmup, graphs):
    import torch_fused_a2a as tfa

    env = dict(cfg.get("env", {}))
    ablate = env.pop("FUSED_A2A_CUDA_ABLATE", None)  # only around the timed dispatches
    _set_case_env(env)
    device = torch.device("cuda", rank)
    n, h, k, e, sms = cfg["n"], cfg["h"], cfg["k"], cfg["e"], cfg["sms"]
    group = dist.group.WORLD
    idx, w = _routing(n, e, k, rank, device)
    x = torch.randn(n, h, device=device).to(torch.bfloat16)
    buf = tfa.get_buffer(group, tfa.get_hidden_bytes(x), device)
    ops = torch.ops.fused_a2a
    gid, grank = buf.group_id, buf.rank

    # The handle (and exact capacity) from one dynamic dispatch.
    rx, _, ridx, rw, counts, src, tpe, stats, _ = ops.dispatch(
        x, None, idx, w, e, gid, grank, world, -1, sms
    )
    y = rx.clone()
    cap = world * n if cfg.get("worst_cap") else rx.shape[0]
    own = int(counts[rank].item())

    fp8 = bool(cfg.get("fp8"))
    x_send, scales = (x.to(torch.float8_e4m3fn), _block_amax(x)) if fp8 else (x, None)

    def static_dispatch():
        ops.dispatch(x_send, scales, idx, w, e, gid, grank, world, cap, sms)

    def cached_dispatch():
        ops.cached_dispatch(x, idx, counts, src, stats, e, gid, grank, sms)

    def dynamic_dispatch():
        ops.dispatch(x_send, scales, idx, w, e, gid, grank, world, -1, sms)

    def combine():
        ops.combine(y, None, idx, counts, src, stats, e, n, False, gid, grank, sms)

    # NCCL all_to_all_single of the same rows (grouped by destination, splits known).
    owners = torch.where(idx >= 0, idx // (e // world), -1)
    in_rank = torch.stack([(owners == d).any(1) for d in range(world)], 1)
    send_idx = torch.cat([torch.nonzero(in_rank[:, d]).flatten() for d in range(world)])
    rows = x  # FP8: each row's e4m3 bytes and its scales' bytes, as one uint8 row
    if fp8:
        rows = torch.cat([x_send.view(torch.uint8), scales.view(torch.uint8)], 1)
    send = rows.index_select(0, send_idx)
    in_splits = in_rank.sum(0).to(torch.int64)
    out_splits = torch.empty_like(in_splits)
    dist.all_to_all_single(out_splits, in_splits)
    recv = torch.empty(int(out_splits.sum()), rows.shape[1], dtype=rows.dtype, device=device)
    in_l, out_l = in_splits.tolist(), out_splits.tolist()

    def nccl_a2a():
        dist.all_to_all_single(recv, send, out_l, in_l)

    res = dict(
        case=name,
        n=n,
        h=h,
        k=k,
        e=e,
        sms=sms,
        env=cfg.get("env", {}),
        num_recv=cap,
        own_rows=own,
        row_bytes=rows.shape[1] * rows.element_size(),
    )
    if ablate:
        static_dispatch, cached_dispatch, dynamic_dispatch = (
            _ablated(fn, ablate) for fn in (static_dispatch, cached_dispatch, dynamic_dispatch)
        )
    timed = dict(
        static_dispatch=static_dispatch,
        cached_dispatch=cached_dispatch,
        combine=combine,
        dynamic_dispatch=dynamic_dispatch,
        nccl_a2a=nccl_a2a,
    )
    if fp8:  # the bf16 ops would be timed against FP8 row bytes
        del timed["cached_dispatch"], timed["combine"]
    for key, fn in timed.items():
        res[f"{key}_us"] = _events_median(fn, iters, warmup)
    if graphs:
        for key in ("static_dispatch", "cached_dispatch", "combine"):
            if key in timed:
                res[f"{key}_graph_us"] = _graph_time(timed[key], 10, 5)
    # correctness spot check: combine(dispatch(x)) == count * x, exactly
    rx2 = ops.dispatch(x, None, idx, w, e, gid, grank, world, cap, sms)[0]
    rows_recv = y.shape[0]  # worst_cap: the rows past these are the zeroed padding
    out, _ = ops.combine(
        rx2[:rows_recv], None, idx, counts, src, stats, e, n, False, gid, grank, sms
    )
    padding_zero = not torch.any(rx2[rows_recv:].view(torch.int16))
    cnt = in_rank.sum(1).float()
    expect = ((x.float() * cnt[:, None]) + 0.0).to(torch.bfloat16)
    res["exact"] = torch.equal(out.view(torch.int16), expect.view(torch.int16)) and padding_zero
    if fp8:  # FP8 rows and scales arrive as the bf16 rows do, converted on the sender
        rx8, rs8 = ops.dispatch(x_send, scales, idx, w, e, gid, grank, world, cap, sms)[:2]
        same_rows = torch.equal(
            rx8.view(torch.uint8), rx2.to(torch.float8_e4m3fn).view(torch.uint8)
        )
        res["exact"] &= bool(same_rows and torch.equal(rs8, _block_amax(rx2)))
    if os.environ.get("FUSED_A2A_CUDA_TRACE"):
        res["trace"] = _trace_one(static_dispatch, gid, grank, sms)
    if os.environ.get("FA2A_BENCH_KERNELS"):
        res["kernels"] = {
            key: _kernel_times(timed[key])
            # the dynamic dispatch's kernels too: its event times include the host's count wait,
            # which spread by ~50 us between identical cases (run 68)
            for key in (
                "static_dispatch",
                "cached_dispatch",
                "dynamic_dispatch",
                "combine",
                "nccl_a2a",
            )
            if key in timed  # the FP8 cases have no cached dispatch or combine
        }
    return res


def _ablated(fn, bits):
    """fn run with FUSED_A2A_CUDA_ABLATE=bits (read at each launch), so that the handle and the
    combine input of the case come from a complete dispatch."""

    def run():
        os.environ["FUSED_A2A_CUDA_ABLATE"] = bits
        try:
            fn()
        finally:
            os.environ.pop("FUSED_A2A_CUDA_ABLATE", None)

    return run


def _kernel_times(fn, calls=10):
    """The GPU kernels and copies of one call, from torch.profiler over `calls` calls:
    [(name, launches per call, mean us per launch)], longest first. A kernel that waits for a
    peer counts its wait."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    dist.barrier()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    rows = []
    for ev in prof.key_averages():
        total = getattr(ev, "device_time_total", None) or getattr(ev, "cuda_time_total", 0)
        if total and ev.count:
            rows.append((ev.key[:80], round(ev.count / calls, 2), round(total / ev.count, 1)))
    return sorted(rows, key=lambda r: -r[1] * r[2])


TRACE_SENDER = ("ready_wait", "chunk_start_wait", "meta", "pushes", "chunk_end", "drain")
TRACE_RECEIVER = ("flag_wait", "remote_copy", "own_copy", "zero_rows", "round_barrier")
TRACE_SLOTS = 11  # csrc/kernels/cuda/state.h kTraceSlots


def _trace_one(fn, gid, grank, sms):
    """Per-warp phase times of one call (csrc/kernels/cuda/state.h): mean and max over the
    sender and the receiver warps; durations in SM cycles, start and finish times in ns (a
    receiver's start is its data phase start)."""
    import fused_a2a_core as core

    torch.cuda.synchronize()
    core.cuda_dispatch_trace(gid, grank, True)
    dist.barrier()
    fn()
    words = core.cuda_dispatch_trace(gid, grank, True)
    if not words:
        return {"error": "tracing is off in this build (-DFA2A_CUDA_TRACE=1)"}
    send_warps = int(os.environ.get("FUSED_A2A_CUDA_SEND_WARPS", 4))
    recv_warps = int(os.environ.get("FUSED_A2A_CUDA_RECV_WARPS", 12))
    slots = [
        words[i * TRACE_SLOTS : (i + 1) * TRACE_SLOTS] for i in range(len(words) // TRACE_SLOTS)
    ]
    senders = [slots[b * 16 + w] for b in range(sms) for w in range(send_warps)]
    receivers = [
        slots[b * 16 + w] for b in range(sms) for w in range(send_warps, send_warps + recv_warps)
    ]

    def stats(rows, names):
        out = {}
        for i, name in enumerate(names):
            vals = [r[i] for r in rows]
            out[name + "_cycles"] = [statistics.mean(vals), max(vals)]
        out["finish_ns"] = [statistics.mean(r[6] for r in rows), max(r[6] for r in rows)]
        out["chunks"] = [statistics.mean(r[7] for r in rows), max(r[7] for r in rows)]
        out["start_ns"] = [statistics.mean(r[8] for r in rows), max(r[8] for r in rows)]
        # the role's item loop minus its traced phases (slots 0-4 for both roles, and the
        # senders' claims, slot 10; their drain, slot 5, comes after the loop): time between and
        # around the phases
        untraced = [r[9] - sum(r[:5]) - r[10] for r in rows]
        out["loop_cycles"] = [statistics.mean(r[9] for r in rows), max(r[9] for r in rows)]
        out["untraced_cycles"] = [statistics.mean(untraced), max(untraced)]
        return out

    receiver = stats(receivers, TRACE_RECEIVER)
    # Receivers' slot 5: the last chunk flag seen (ns after kernel start). The copy tail is a
    # warp's finish minus that; the kernel's tail is the latest finish minus the latest flag.
    flagged = [r for r in receivers if r[5] > 0]
    if flagged:
        tails = [r[6] - r[5] for r in flagged]
        receiver["last_flag_ns"] = [
            statistics.mean(r[5] for r in flagged),
            max(r[5] for r in flagged),
        ]
        receiver["copy_tail_ns"] = [statistics.mean(tails), max(tails)]
        receiver["kernel_tail_ns"] = max(r[6] for r in receivers) - max(r[5] for r in flagged)
    sender = stats(senders, TRACE_SENDER)
    sender["claim_cycles"] = [statistics.mean(r[10] for r in senders), max(r[10] for r in senders)]
    return {"sender": sender, "receiver": receiver}


def _summarize(per_rank):
    first = per_rank[0]
    out = {k: first[k] for k in ("case", "n", "h", "k", "e", "sms", "env")}
    out["exact_all_ranks"] = all(r["exact"] for r in per_rank)
    if "trace" in first:
        out["trace_per_rank"] = [r["trace"] for r in per_rank]
    if "kernels" in first:
        out["kernels_per_rank"] = [r["kernels"] for r in per_rank]
    recv_b = [r["num_recv"] * r["row_bytes"] for r in per_rank]
    wire_b = [(r["num_recv"] - r["own_rows"]) * r["row_bytes"] for r in per_rank]
    out["recv_bytes_per_rank_mean"] = statistics.mean(recv_b)
    out["wire_bytes_per_rank_mean"] = statistics.mean(wire_b)
    for key in [k for k in first if k.endswith("_us")]:
        t = max(r[key] for r in per_rank)  # slowest rank
        name = key[: -len("_us")]
        out[f"{name}_us"] = round(t, 2)
        out[f"{name}_deepep_GBps"] = round(statistics.mean(recv_b) / t / 1e3, 1)
        out[f"{name}_wire_GBps"] = round(statistics.mean(wire_b) / t / 1e3, 1)
    return out


def _worker(rank, world, port, args, queue):
    init_rank(rank, world, port, cuda=True)
    results = []
    for name in args.cases.split(","):
        try:
            res = _run_case(name, CASES[name], rank, world, args.iters, args.warmup, args.graphs)
        except Exception as exc:  # noqa: BLE001
            res = dict(case=name, error=f"{type(exc).__name__}: {exc}")
        gathered = [None] * world
        dist.all_gather_object(gathered, res)
        if rank == 0:
            if any("error" in g for g in gathered):
                summary = dict(case=name, errors=[g.get("error") for g in gathered])
            else:
                summary = _summarize(gathered)
            results.append(summary)
            print(json.dumps(summary), flush=True)
    if rank == 0:
        queue.put(results)
    dist.barrier()
    dist.destroy_process_group()


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--world", type=int, default=torch.cuda.device_count())
    parser.add_argument("--cases", default="standard,standard_sms12,decode")
    parser.add_argument("--iters", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--graphs", type=int, default=1)
    parser.add_argument("--out", default="")
    args = parser.parse_args()
    start = time.time()
    results = spawn_ranks(_worker, args.world, args, timeout=3000)
    meta = dict(
        world=args.world,
        device=torch.cuda.get_device_name(0),
        torch=torch.__version__,
        date=time.strftime("%Y-%m-%d %H:%M:%S"),
        seconds=round(time.time() - start, 1),
        commit=os.environ.get("FA2A_COMMIT", ""),
    )
    doc = dict(meta=meta, results=results)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(doc, f, indent=1)
    return 0 if all("errors" not in r for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
