"""``fused-a2a``: the main job.

    fused-a2a bench [--ranks G] [--tokens N ...] [--hidden H] [--topk K] [--experts E]
                    [--dtype bf16] [--frontend torch] [--out DIR]
    fused-a2a check

``bench`` runs dispatch + combine on G real ranks (one process per rank: gloo on CPU, NCCL on
GPUs), checks every rank's outputs bit for bit against a NumPy computation of the same inputs, and
prints a table of time and bandwidth; JSON goes to --out. With no GPU it runs on CPU processes
with a scaled-down case.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import queue as queue_module
import socket
import sys
import time

from fused_a2a._common import build_info


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _gpu_count() -> int:
    return int(build_info().get("cuda_devices", 0)) if build_info().get("cuda") else 0


def run_torch_case(case: dict, world: int, timeout: float) -> list[dict]:
    """Runs one case on `world` rank processes; returns their result dicts (rank order)."""
    from fused_a2a.bench_torch import rank_main

    ctx = multiprocessing.get_context("spawn")
    results_queue = ctx.Queue()
    port = _free_port()
    procs = [
        ctx.Process(target=rank_main, args=(r, world, port, case, results_queue), daemon=True)
        for r in range(world)
    ]
    for p in procs:
        p.start()
    results: dict[int, dict] = {}
    deadline = time.monotonic() + timeout
    try:
        while len(results) < world:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                missing = sorted(set(range(world)) - set(results))
                raise TimeoutError(f"bench: ranks {missing} did not finish within {timeout} s")
            try:
                rank, result = results_queue.get(timeout=min(remaining, 1.0))
            except queue_module.Empty:
                if any(p.exitcode not in (None, 0) for p in procs) and not results_queue.qsize():
                    dead = [r for r, p in enumerate(procs) if p.exitcode not in (None, 0)]
                    raise RuntimeError(f"bench: rank processes {dead} died") from None
                continue
            results[rank] = result
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
    errors = [f"rank {r}: {res['error']}" for r, res in sorted(results.items()) if "error" in res]
    if errors:
        raise RuntimeError("bench failed:\n" + "\n".join(errors))
    return [results[r] for r in range(world)]


def summarize(case: dict, ranks: list[dict]) -> dict:
    dispatch_us = max(r["dispatch_us"] for r in ranks)
    combine_us = max(r["combine_us"] for r in ranks)
    recv_bytes = sum(r["recv_bytes"] for r in ranks) / len(ranks)
    remote_bytes = sum(r["remote_bytes"] for r in ranks) / len(ranks)
    return {
        **{
            k: case[k]
            for k in ("frontend", "mode", "device", "tokens", "hidden", "topk", "experts", "dtype")
        },
        "ranks": len(ranks),
        "verified": all(r["verified"] for r in ranks),
        "dispatch_us": dispatch_us,
        "combine_us": combine_us,
        "dispatch_gbps": recv_bytes / dispatch_us / 1e3,
        "combine_gbps": recv_bytes / combine_us / 1e3,
        "dispatch_wire_gbps": remote_bytes / dispatch_us / 1e3,
        "combine_wire_gbps": remote_bytes / combine_us / 1e3,
    }


def _print_table(rows: list[dict]) -> None:
    header = (
        f"{'frontend':8} {'mode':7} {'dev':4} {'G':>2} {'N':>6} {'H':>6} {'dtype':5} "
        f"{'disp us':>9} {'comb us':>9} {'disp GB/s':>9} {'comb GB/s':>9} verified"
    )
    print(header)
    print("-" * len(header))
    for r in rows:
        print(
            f"{r['frontend']:8} {r['mode']:7} {r['device']:4} {r['ranks']:>2} {r['tokens']:>6} "
            f"{r['hidden']:>6} {r['dtype']:5} {r['dispatch_us']:>9.1f} {r['combine_us']:>9.1f} "
            f"{r['dispatch_gbps']:>9.2f} {r['combine_gbps']:>9.2f} "
            f"{'yes' if r['verified'] else 'NO'}"
        )


def cmd_bench(args) -> int:
    gpus = _gpu_count()
    device = "cuda" if gpus >= 2 else "cpu"
    world = args.ranks or (gpus if device == "cuda" else 4)
    tokens = args.tokens or ([4096] if device == "cuda" else [64, 256])
    hidden = args.hidden or (7168 if device == "cuda" else 1024)
    experts = args.experts or (256 if device == "cuda" else 32)
    rows = []
    total = len(tokens)
    for i, n in enumerate(tokens):
        case = {
            "frontend": "torch",
            "mode": "normal",
            "device": device,
            "tokens": n,
            "hidden": hidden,
            "topk": args.topk,
            "experts": experts,
            "dtype": args.dtype,
            "seed": args.seed,
            "warmup": args.warmup,
            "iters": args.iters,
        }
        bar = "#" * (i * 20 // total) + "." * (20 - i * 20 // total)
        print(f"[{bar}] {i}/{total} torch normal N={n} on {world} {device} ranks", flush=True)
        rows.append(summarize(case, run_torch_case(case, world, args.timeout)))
    print(f"[{'#' * 20}] {total}/{total} done", flush=True)
    _print_table(rows)
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "bench.json")
    with open(path, "w") as f:
        json.dump(
            {"build": build_info(), "date": time.strftime("%Y-%m-%d %H:%M:%S"), "results": rows},
            f,
            indent=2,
        )
    print(f"wrote {path}")
    return 0 if all(r["verified"] for r in rows) else 1


def cmd_check(args) -> int:
    info = build_info()
    print("build:", json.dumps(info))
    case = {
        "frontend": "torch",
        "mode": "normal",
        "device": "cpu",
        "tokens": 32,
        "hidden": 128,
        "topk": 4,
        "experts": 8,
        "dtype": "bf16",
        "seed": 1,
        "warmup": 0,
        "iters": 1,
    }
    ok = all(r["verified"] for r in run_torch_case(case, 2, 120))
    print(f"cpu round trip (torch, 2 ranks): {'ok' if ok else 'MISMATCH'}")
    return 0 if ok else 1


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="fused-a2a", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    bench = sub.add_parser("bench", help="benchmark dispatch/combine with exactness checks")
    bench.add_argument("--ranks", type=int, default=0)
    bench.add_argument("--tokens", type=int, nargs="*", default=None)
    bench.add_argument("--hidden", type=int, default=0)
    bench.add_argument("--topk", type=int, default=8)
    bench.add_argument("--experts", type=int, default=0)
    bench.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default="bf16")
    bench.add_argument("--seed", type=int, default=0)
    bench.add_argument("--warmup", type=int, default=3)
    bench.add_argument("--iters", type=int, default=20)
    bench.add_argument("--timeout", type=float, default=600)
    bench.add_argument("--out", default="fused_a2a_out")
    sub.add_parser("check", help="verify this machine: build, devices, a small round trip")
    args = parser.parse_args(argv)
    return {"bench": cmd_bench, "check": cmd_check}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
