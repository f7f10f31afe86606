"""The cases of benchmarks/bench_normal.py: name -> dict(n, h, k, e, sms, env knobs, fp8,
worst_cap). Each case after `standard` / `decode` is an A/B of one knob (FUSED_A2A_CUDA_*,
FUSED_A2A_TORCH_*, FUSED_A2A_BUFFER_*) against the defaults, commented with the session and the run
that motivated it; benchmarks/NOTES.md has the outcomes."""

from __future__ import annotations


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
# Session 23 (issue 7, 12 SMs): run 124's traces put a 12-SM sender warp's metadata phase at 26%
# of its loop (351K of 1.37M cycles; 12% at 48 SMs): about three load latencies per 8-row chunk
# (the list, then two batches of words). Larger chunks (fewer list loads and chunk ends; with
# direct rows the receivers no longer copy a chunk after its flag, the tail that chose 8 rows in
# run 22), and the records kernel (the metadata off the senders' loop), at 12, 16 and 48 SMs.
for _sms in (12, 16, 48):
    for _cr in (16, 32, 64):
        CASES[f"standard_sms{_sms}_cr{_cr}"] = _case(sms=_sms, CHUNK_ROWS=str(_cr))
CASES["standard_sms12_rec"] = _case(sms=12, RECORDS="1")
# The standard case at 12, 24 and 48 SMs, for the A/B families below
_STANDARD_BY_SMS = (
    ("standard_sms12", dict(sms=12)),
    ("standard", {}),
    ("standard_sms48", dict(sms=48)),
)
# The records' index and weight words word by word (FUSED_A2A_CUDA_META_VEC=0), against the 16-byte
# vector loads, the default since session 24 (run 129: 12 SMs -22 us, 24 SMs -5, FP8 -7).
for _name, _base in (
    *_STANDARD_BY_SMS,
    ("standard_fp8_sms48", dict(fp8=True, sms=48)),
    ("decode", dict(n=128)),
):
    CASES[_name + "_metawords"] = _case(**_base, META_VEC="0")
# The route scan's first pass in the dispatch / combine kernel (FUSED_A2A_CUDA_SCAN_PASS1=fused,
# session 25), against route_mask_kernel before it (4.4 us at N = 4096 in run 135's profile).
for _name, _base in _STANDARD_BY_SMS:
    CASES[_name + "_pass1"] = _case(**_base, SCAN_PASS1="fused")
# Receiver warps pushing rows with plain stores beside the senders' bulk copies
# (FUSED_A2A_CUDA_RECV_PUSH=n, session 25; 4 by default since session 26, runs 140-145: static
# dispatch 12 SMs 533 -> 525 us, 24 SMs 522 -> 507, 48 SMs 513 -> 502, 8 warps lose): *_nopush
# without them (the default before), *_push8 with 8.
for _name, _base in _STANDARD_BY_SMS:
    CASES[f"{_name}_nopush"] = _case(**_base, RECV_PUSH="0")
    CASES[f"{_name}_push8"] = _case(**_base, RECV_PUSH="8")
# FP8: the pushing receivers need the fused scan, so no records kernel (FP8 at 48 SMs 322.5 ->
# 290.2 us); without them the records kernel above 512 tokens, as before session 26
CASES["standard_fp8_sms48_nopush"] = _case(fp8=True, sms=48, RECV_PUSH="0")
CASES["standard_fp8_nopush"] = _case(fp8=True, RECV_PUSH="0")
for _name, _base in _STANDARD_BY_SMS:
    # The combine's weights (the dispatch backward's, timed as combine_weights) as one more piece
    # of the senders' rings (FUSED_A2A_CUDA_COMBINE_WEIGHTS=bulk, session 26; the default since
    # session 28: run 156, EP 4 24 SMs 536.5 us against 577.3), or the lanes' stores with a system
    # fence before each chunk's flag (*_wlanes; the default before: runs 142-143, the dispatch
    # backward at 24 SMs 581 us, the combine 532; EP 2 runs 148-149: the rings lost, 252 / 246,
    # with 4 sender warps).
    CASES[f"{_name}_wbulk"] = _case(**_base, COMBINE_WEIGHTS="bulk")
    CASES[f"{_name}_wlanes"] = _case(**_base, COMBINE_WEIGHTS="lanes")
    # EP 2's combine reducers with 4 vectors a source a step (FUSED_A2A_CUDA_REDUCE=batch, before
    # session 26) against 8 (reduce_row_once, the default on 2 ranks): for BENCH_CASES_EP2.
    CASES[f"{_name}_rbatch"] = _case(**_base, REDUCE="batch")
# FP8 rows in 16-row chunks (FUSED_A2A_CUDA_CHUNK_ROWS=16): 8 by default from 24 SMs, sized for
# 14 KB bf16 rows, so an FP8 chunk moves half the bytes for the same per-chunk work (records,
# flag); run 140's FP8 dispatch moved 80% of the ceiling on the wire against bf16's 89%.
CASES["standard_fp8_cr16"] = _case(fp8=True, CHUNK_ROWS="16")
CASES["standard_fp8_sms48_cr16"] = _case(fp8=True, sms=48, CHUNK_ROWS="16")
# 12 SMs with the pushing receivers: 32-row chunks there (458 KB of bf16 rows an item, which a
# plain-store warp moves several times slower than a ring: push 8 lost, 547 us against 525 with
# 4), so 16-row chunks, and 2 pushing warps.
CASES["standard_sms12_cr16"] = _case(sms=12, CHUNK_ROWS="16")
CASES["standard_sms12_push2"] = _case(sms=12, RECV_PUSH="2")
# The flag waits' first load relaxed, then an acquire once up (FUSED_A2A_CUDA_WAIT=relaxed, before
# session 26), against an acquire first (one round trip where the flag is already up).
for _name, _base in _STANDARD_BY_SMS:
    CASES[f"{_name}_wrelaxed"] = _case(**_base, WAIT="relaxed")
# Session 27 (2x H200, EP 2, runs 149-150): FP8 at 24 SMs 195-196 us in 8-row chunks, 175-177 in
# 16, while at 48 SMs 16 rows lost (139 -> 144): the chunk rows of FP8 rows by SM count.
for _sms in (16, 24, 32, 48):
    for _rows in (8, 16, 32):
        CASES[f"fp8_sms{_sms}_cr{_rows}"] = _case(fp8=True, sms=_sms, CHUNK_ROWS=str(_rows))
# EP 2's combine has one peer to send to: fewer sender warps, more reducers (the dispatch takes
# the same split in these cases).
for _name, _base in _STANDARD_BY_SMS:
    CASES[f"{_name}_sw2"] = _case(**_base, SEND_WARPS="2", RECV_WARPS="14")
    CASES[f"{_name}_sw3"] = _case(**_base, SEND_WARPS="3", RECV_WARPS="13")
# The combine's own sender warps (FUSED_A2A_CUDA_COMBINE_SEND_WARPS; combine_send_warps: on 2
# ranks 3 below 48 SMs and 2 from 48, on more 3 from 48 and 4 below, since session 28): 4, as
# the dispatch's and as before, and 3.
for _name, _base in _STANDARD_BY_SMS:
    CASES[f"{_name}_csw4"] = _case(**_base, COMBINE_SEND_WARPS="4")
    CASES[f"{_name}_csw3"] = _case(**_base, COMBINE_SEND_WARPS="3")
# The combine's reducers without / with the L2 prefetch of their next token's rows
# (FUSED_A2A_CUDA_REDUCE_PREFETCH; off by default since session 28: runs 156-157, 12 SMs EP 4 634
# us with, 579 without, EP 2 335 / 312; level at 24 and 48).
for _name, _base in _STANDARD_BY_SMS:
    CASES[f"{_name}_nopf"] = _case(**_base, REDUCE_PREFETCH="0")
    CASES[f"{_name}_pf"] = _case(**_base, REDUCE_PREFETCH="1")
# FP8 at 24 SMs in 16- / 32-row chunks with more sender warps (run 150, EP 2, 8-row chunks: 8
# sender warps 190 us against 196 with 4; 6 lost, 204)
for _rows in (16, 32):
    for _send in (6, 8):
        CASES[f"fp8_sms24_cr{_rows}_s{_send}"] = _case(
            fp8=True, CHUNK_ROWS=str(_rows), SEND_WARPS=str(_send), RECV_WARPS=str(16 - _send)
        )
# The cached dispatch (combine's backward) through dispatch_data, as before session 29
# (FUSED_A2A_CUDA_CACHED=data; default: a static dispatch of the handle's topk_idx and capacity).
# Session 29 (run 162, EP 4): cached 532.6 us at 24 SMs against the static dispatch's 507.8.
for _name, _base in _STANDARD_BY_SMS + (("decode", dict(n=128)),):
    CASES[f"{_name}_cached_data"] = _case(**_base, CACHED="data")
