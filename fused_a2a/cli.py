"""``fused-a2a``: the main job.

    fused-a2a bench [--ranks G] [--tokens N ...] [--hidden H] [--topk K] [--experts E]
                    [--dtype bf16|fp16|fp32] [--mode normal|hybrid|all]
                    [--frontend torch|jax|all] [--out DIR] [--no-peers]
    fused-a2a check
    fused-a2a report FILE.json ...

``bench`` runs dispatch and combine, forward and backward, through both frontends (torch: one
process per rank, gloo on CPU / NCCL on GPUs; JAX: every rank a device of one process) and both
modes (normal, HybridEP), next to the peers of the same run (torch all_to_all_single of the same
rows; jax.lax.ragged_all_to_all on GPU, a capacity-padded jax.lax.all_to_all on CPU; DeepEP when
``import deep_ep`` works). Every op's output is checked bit for bit against a NumPy computation of
the same inputs (fused_a2a/routing.py). On all GPUs (>= 2) it runs the standard case of
BENCHMARKS.md (N = 4096, H = 7168, top-8 of 256, bf16) and a sweep of N; with no GPU, a scaled-down
case on 4 CPU ranks. Prints a summary table, writes bench.json and bench.png to --out.
``check`` verifies this machine: build, devices, peer access, a small round trip per frontend.
``report`` prints Markdown tables of bench JSON files (this command's, or
benchmarks/bench_normal.py's).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import queue as queue_module
import shutil
import socket
import subprocess
import sys
import threading
import time

from fused_a2a import bench_report as report
from fused_a2a._common import build_info

GPU_DEFAULTS = dict(
    tokens=[128, 512, 1024, 2048, 4096, 8192],
    standard=4096,
    hidden=7168,
    experts=256,
    topk=8,
    iters=20,
    warmup=5,
    reps=5,
)
CPU_DEFAULTS = dict(
    tokens=[64, 256, 512], standard=256, hidden=1024, experts=32, topk=8, iters=10, warmup=2, reps=3
)
TORCH_UNITS = {
    "normal": ["fused_normal"],
    "hybrid": ["fused_hybrid"],
    "all": ["fused_normal", "fused_hybrid"],
}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def gpu_count() -> int:
    """GPUs the compiled core can use (0 for a CPU-only build), without initialising JAX."""
    info = build_info()
    return int(info.get("cuda_devices", 0)) if info.get("cuda") else 0


def _gpu_name() -> str:
    smi = shutil.which("nvidia-smi")
    if smi:
        try:
            out = subprocess.run(
                [smi, "--query-gpu=name", "--format=csv,noheader"],
                capture_output=True,
                text=True,
                timeout=30,
            ).stdout
            if out.strip():
                return out.strip().splitlines()[0]
        except (OSError, subprocess.SubprocessError):
            pass
    return "GPU"


class Progress:
    """A one-line progress bar (redrawn in place on a terminal, a line per step otherwise)."""

    def __init__(self, total: int, stream=None):
        self.total, self.done, self.t0 = max(total, 1), 0, time.monotonic()
        self.stream = stream or sys.stdout
        self.tty = self.stream.isatty()

    def step(self, text: str) -> None:
        self.done = min(self.done + 1, self.total)
        filled = self.done * 24 // self.total
        line = (
            f"[{'#' * filled}{'.' * (24 - filled)}] {self.done:>3}/{self.total} "
            f"{time.monotonic() - self.t0:6.1f}s {text}"
        )
        if self.tty:
            self.stream.write("\r\033[K" + line[:150])
            if self.done == self.total:
                self.stream.write("\n")
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.tty and self.done < self.total:
            self.stream.write("\n")
            self.stream.flush()


def run_torch(spec: dict, world: int, timeout: float, on_progress=None) -> list[list[dict]]:
    """Runs the spec on `world` rank processes; returns every rank's unit results."""
    from fused_a2a.bench_torch import rank_main

    ctx = multiprocessing.get_context("spawn")
    results_queue = ctx.Queue()
    port = _free_port()
    procs = [
        ctx.Process(target=rank_main, args=(r, world, port, spec, results_queue), daemon=True)
        for r in range(world)
    ]
    for p in procs:
        p.start()
    results: dict[int, list] = {}
    deadline = time.monotonic() + timeout
    try:
        while len(results) < world:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                missing = sorted(set(range(world)) - set(results))
                raise TimeoutError(
                    f"torch bench: ranks {missing} did not finish within "
                    f"{timeout:.0f} s (see --timeout)"
                )
            try:
                msg = results_queue.get(timeout=min(remaining, 1.0))
            except queue_module.Empty:
                dead = [r for r, p in enumerate(procs) if p.exitcode not in (None, 0)]
                if dead and results_queue.empty():
                    raise RuntimeError(
                        f"torch bench: rank processes {dead} died (exit codes "
                        f"{[procs[r].exitcode for r in dead]})"
                    ) from None
                continue
            if msg[0] == "progress":
                if on_progress:
                    on_progress(msg[1])
            elif msg[0] == "fatal":
                raise RuntimeError(f"torch bench: rank {msg[1]} failed:\n{msg[2]}")
            else:
                results[msg[1]] = msg[2]
    finally:
        for p in procs:
            p.join(timeout=15)
            if p.is_alive():
                p.kill()
                p.join(timeout=5)
    return [results[r] for r in range(world)]


def jax_env(device: str, world: int) -> dict:
    env = dict(os.environ)
    if device == "cuda":
        env["JAX_PLATFORMS"] = "cuda"
        env.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    else:
        env["JAX_PLATFORMS"] = "cpu"
        flags = [
            f
            for f in env.get("XLA_FLAGS", "").split()
            if not f.startswith("--xla_force_host_platform_device_count")
        ]
        env["XLA_FLAGS"] = " ".join(flags + [f"--xla_force_host_platform_device_count={world}"])
    return env


def run_jax(spec: dict, device: str, timeout: float, on_progress=None) -> dict:
    """Runs the spec in a JAX child process; returns its RESULT document."""
    cmd = [sys.executable, "-m", "fused_a2a.bench_jax", json.dumps(spec)]
    proc = subprocess.Popen(
        cmd,
        env=jax_env(device, spec["ranks"]),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    lines: queue_module.Queue = queue_module.Queue()
    tail: list[str] = []

    def reader():
        for line in proc.stdout:
            lines.put(line.rstrip("\n"))
        lines.put(None)

    threading.Thread(target=reader, daemon=True).start()
    deadline, result = time.monotonic() + timeout, None
    try:
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(
                    f"JAX bench did not finish within {timeout:.0f} s "
                    f"(see --timeout); last output:\n" + "\n".join(tail[-20:])
                )
            try:
                line = lines.get(timeout=min(remaining, 1.0))
            except queue_module.Empty:
                continue
            if line is None:
                break
            if line.startswith("PROGRESS "):
                if on_progress:
                    on_progress(line[len("PROGRESS ") :])
            elif line.startswith("RESULT "):
                result = json.loads(line[len("RESULT ") :])
            else:
                tail.append(line)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=30)
    if result is None:
        raise RuntimeError(
            f"JAX bench exited with {proc.returncode} without a result:\n" + "\n".join(tail[-40:])
        )
    if "fatal" in result:
        raise RuntimeError(f"JAX bench failed: {result['fatal']}")
    return result


def jax_available() -> str:
    """'' when jax and the XLA FFI handlers are importable, else the reason."""
    import importlib.util

    if importlib.util.find_spec("jax") is None:
        return "jax is not installed"
    if not build_info().get("xla_ffi"):
        return "fused_a2a_core was built without XLA FFI handlers"
    return ""


def _versions() -> dict:
    out = {"python": platform.python_version()}
    for mod in ("torch", "jax", "jaxlib", "numpy"):
        try:
            out[mod] = __import__(mod).__version__
        except Exception:  # noqa: BLE001 - absent is fine
            out[mod] = None
    return out


def _commit() -> str | None:
    if os.environ.get("FA2A_COMMIT"):
        return os.environ["FA2A_COMMIT"]
    try:
        here = os.path.dirname(os.path.abspath(__file__))
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=here,
            capture_output=True,
            text=True,
            timeout=10,
        )
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def _bench_config(args) -> dict:
    gpus = gpu_count()
    device = "cuda" if gpus >= 2 and args.device != "cpu" else "cpu"
    d = GPU_DEFAULTS if device == "cuda" else CPU_DEFAULTS
    world = args.ranks or (gpus if device == "cuda" else 4)
    if device == "cuda" and world > gpus:
        raise SystemExit(f"--ranks {world}: only {gpus} GPUs visible")
    if world < 1:
        raise SystemExit("--ranks must be >= 1")
    tokens = args.tokens or d["tokens"]
    experts = args.experts or d["experts"]
    if experts % world:
        raise SystemExit(f"--experts {experts} must be a multiple of --ranks {world}")
    topk = args.topk or d["topk"]
    if not 1 <= topk <= experts:
        raise SystemExit(f"--topk {topk} must be in [1, {experts}]")
    return {
        "device": device,
        "ranks": world,
        "tokens": sorted(set(tokens)),
        "standard": d["standard"] if d["standard"] in tokens else max(tokens),
        "hidden": args.hidden or d["hidden"],
        "topk": topk,
        "experts": experts,
        "dtype": args.dtype,
        "seed": args.seed,
        "iters": args.iters or d["iters"],
        "warmup": d["warmup"],
        "reps": d["reps"],
    }


def units_of(cfg: dict, mode: str, frontend: str, peers: bool = True) -> dict:
    """{frontend: [units]} to run."""
    import importlib.util

    out = {}
    for fe in ("torch", "jax") if frontend == "all" else (frontend,):
        units = list(TORCH_UNITS[mode]) + (["a2a"] if peers else [])
        if fe == "torch" and "fused_hybrid" in units:  # HybridEP's baseline, right after it
            units.insert(units.index("fused_hybrid") + 1, "fused_normal_permute")
        if (
            fe == "torch"
            and peers
            and cfg["device"] == "cuda"
            and importlib.util.find_spec("deep_ep") is not None
        ):
            units.append("deep_ep")
        out[fe] = units
    return out


def _collect(cfg, units, timeout, progress) -> tuple[list, list, list, dict]:
    from fused_a2a import bench_torch

    rows, skipped, errors, info = [], [], [], {}
    if "torch" in units:
        spec = dict(cfg, units=units["torch"])
        try:
            per_rank = run_torch(spec, cfg["ranks"], timeout, progress.step)
            merged = report.merge_ranks(per_rank)
            got = report.make_rows(
                "torch", bench_torch.UNIT_INFO, merged, cfg["ranks"], cfg["device"]
            )
            for acc, new in zip((rows, skipped, errors), got, strict=True):
                acc.extend(new)
        except Exception as err:  # noqa: BLE001 - reported; the JAX part still runs
            errors.append({"frontend": "torch", "error": f"{type(err).__name__}: {err}"})
    if "jax" in units:
        reason = jax_available()
        if reason:
            skipped.append({"frontend": "jax", "impl": "*", "reason": reason})
        else:
            try:
                doc = run_jax(dict(cfg, units=units["jax"]), cfg["device"], timeout, progress.step)
                info["jax_devices"] = doc["devices"]
                unit_info = {
                    "fused_normal": ("fused_a2a", "normal", False),
                    "fused_hybrid": ("fused_a2a", "hybrid", False),
                    "a2a": (doc["peer"], "rows", True),
                }
                got = report.make_rows(
                    "jax", unit_info, doc["results"], cfg["ranks"], cfg["device"]
                )
                for acc, new in zip((rows, skipped, errors), got, strict=True):
                    acc.extend(new)
            except Exception as err:  # noqa: BLE001 - reported
                errors.append({"frontend": "jax", "error": f"{type(err).__name__}: {err}"})
    return rows, skipped, errors, info


def link_ceilings(ranks: int, sms_list: list[int], timeout: float = 120.0) -> list[dict]:
    """Issue 7's link ceiling of this run, per SM count: the slowest GPU's egress GB/s when the
    ranks' GPUs push to each other at once (the faster of bulk copies alone and with plain-store
    warps beside them, every block released together: csrc/kernels/cuda/link_probe.cuh). In one
    subprocess, so the bench's own process holds no CUDA context and no peer mappings of its
    own."""
    method = (
        "best of 4 bulk-copy warps x 3 stages alone and with 12 plain-store warps, barrier start"
    )
    code = (
        "import json, fused_a2a_core as c; "
        f"print(json.dumps([c.link_ceiling_gbps({ranks}, s) for s in {list(sms_list)}]))"
    )
    try:
        proc = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout
        )
        if proc.returncode == 0:
            got = json.loads(proc.stdout.strip().splitlines()[-1])
            return [
                {"sms": sms, "method": method, "GBps": round(gbps, 1)}
                for sms, gbps in zip(sms_list, got, strict=True)
            ]
        error = (proc.stderr or proc.stdout).strip()[-300:]
    except (subprocess.TimeoutExpired, ValueError, IndexError) as err:
        error = f"{type(err).__name__}: {err}"
    return [{"sms": sms, "method": method, "error": error} for sms in sms_list]


def add_ceiling_shares(rows: list[dict], ceilings: list[dict]) -> None:
    """Each row's wire GB/s as a share of the ceiling measured at its SM count (issue 7's 95%)."""
    by_sms = {c["sms"]: c["GBps"] for c in ceilings if "GBps" in c}
    for row in rows:
        ceiling = by_sms.get(row.get("sms"))
        if ceiling and row.get("wire_gbps"):
            row["of_ceiling"] = round(row["wire_gbps"] / ceiling, 3)


def cmd_bench(args) -> int:
    cfg = _bench_config(args)
    os.environ.setdefault("FUSED_A2A_TIMEOUT_S", "60")
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")  # NVLink multicast stays off
    card = _gpu_name() if cfg["device"] == "cuda" else f"CPU, {os.cpu_count()} cores"
    case = (
        f"G={cfg['ranks']} {cfg['device']} ranks ({card}), H={cfg['hidden']}, "
        f"top-{cfg['topk']} of {cfg['experts']} experts, {cfg['dtype']}, N in {cfg['tokens']}"
    )
    print(f"fused-a2a bench: {case}", flush=True)
    units = units_of(cfg, args.mode, args.frontend, not args.no_peers)
    progress = Progress(sum(len(u) for u in units.values()) * len(cfg["tokens"]))
    t0 = time.monotonic()
    rows, skipped, errors, info = _collect(cfg, units, args.timeout, progress)
    progress.close()
    report.add_ratios(rows)
    ceilings = []
    if cfg["device"] == "cuda" and cfg["ranks"] >= 2:  # issue 7: every run reports its ceiling
        sms_used = sorted({r["sms"] for r in rows if isinstance(r.get("sms"), int)} | {24})
        ceilings = link_ceilings(cfg["ranks"], sms_used)
        add_ceiling_shares(rows, ceilings)
    print(f"\nstandard case, N={cfg['standard']} tokens per rank ({case.split(', N in')[0]}):")
    print(report.format_table(rows, cfg["standard"]))
    for c in ceilings:
        shares = [
            f"{report.impl_label(r)} {r['op']} {r['of_ceiling']:.0%}"
            for r in rows
            if r.get("of_ceiling") and r["tokens"] == cfg["standard"] and r["sms"] == c["sms"]
        ]
        got = f"{c['GBps']:.1f} GB/s per GPU" if "GBps" in c else f"not measured: {c['error']}"
        print(f"link ceiling at {c['sms']} SMs ({c['method']}): {got}")
        if shares:
            print("  wire GB/s of it: " + ", ".join(shares))
    arena_seen = set()
    for r in rows:  # torch's output arena: a full one sends outputs to torch (and the window)
        key = (report.impl_label(r), r["tokens"])
        if r.get("arena") and r["tokens"] == cfg["standard"] and key not in arena_seen:
            arena_seen.add(key)
            a = r["arena"]
            print(
                f"{key[0]} output arena: {a.get('arena', 0)} outputs in it, "
                f"{a.get('no_room', 0)} from torch for want of room (all ranks)"
            )
    if len(cfg["tokens"]) > 1:
        print("\nsweep of N:")
        print(report.format_sweep(rows))
    seen = set()
    for s in skipped:
        key = (s["frontend"], s.get("impl"), s.get("mode"))
        if key not in seen:
            seen.add(key)
            print(
                f"skipped: {s['frontend']} {s.get('impl', '')} {s.get('mode', '')}: "
                f"{s['reason'].splitlines()[0][:300]}"
            )
    for e in errors:
        print(
            f"ERROR: {e['frontend']} {e.get('impl', '')} {e.get('mode', '')} "
            f"N={e.get('tokens', '-')}: {e['error'][:2000]}"
        )
    os.makedirs(args.out, exist_ok=True)
    doc = {
        "meta": {
            "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
            "host": platform.node(),
            "card": card,
            "commit": _commit(),
            "versions": _versions(),
            "build": build_info(),
            "config": cfg,
            "seconds": round(time.monotonic() - t0, 1),
            "timing": (
                "torch: CUDA events around each call, median of iters after warm-up, "
                "slowest rank; JAX: iters calls in a loop inside one jitted program between "
                "two device clock reads (GPU %globaltimer), interval / iters on the slowest "
                "device, median of reps"
                if cfg["device"] == "cuda"
                else "torch: perf_counter per call, median, slowest rank; JAX: iters calls in a "
                "loop inside one jitted program between two host clock reads, interval / "
                "iters on the slowest device, median of reps"
            ),
            "link_ceiling": ceilings,
            **info,
        },
        "rows": rows,
        "skipped": skipped,
        "errors": errors,
    }
    json_path = os.path.join(args.out, "bench.json")
    report.write_json(json_path, doc)
    png_path = os.path.join(args.out, "bench.png")
    try:
        report.plot(png_path, rows, f"fused-a2a bench: {case}")
    except Exception as err:  # noqa: BLE001 - the JSON is still there
        print(f"plot failed: {type(err).__name__}: {err}")
    print(f"wrote {json_path} and {png_path} ({time.monotonic() - t0:.0f} s)")
    ok = bool(rows) and all(r["verified"] for r in rows) and not errors
    if not ok:
        bad = [
            f"{report.impl_label(r)} {r['op']} N={r['tokens']}" for r in rows if not r["verified"]
        ]
        print("NOT VERIFIED: " + (", ".join(bad) if bad else "see errors above"))
    return 0 if ok else 1


def main(argv=None) -> int:
    from fused_a2a import check

    parser = argparse.ArgumentParser(prog="fused-a2a", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    bench = sub.add_parser("bench", help="benchmark dispatch/combine with exactness checks")
    bench.add_argument("--ranks", type=int, default=0, help="EP size (default: all GPUs, or 4)")
    bench.add_argument(
        "--tokens", type=int, nargs="+", default=None, help="tokens per rank, one or more (a sweep)"
    )
    bench.add_argument("--hidden", type=int, default=0)
    bench.add_argument("--topk", type=int, default=0)
    bench.add_argument("--experts", type=int, default=0)
    bench.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default="bf16")
    bench.add_argument("--mode", choices=["normal", "hybrid", "all"], default="all")
    bench.add_argument("--frontend", choices=["torch", "jax", "all"], default="all")
    bench.add_argument(
        "--device",
        choices=["auto", "cpu"],
        default="auto",
        help="cpu: CPU ranks even when GPUs are visible",
    )
    bench.add_argument("--no-peers", action="store_true", help="only fused_a2a")
    bench.add_argument("--iters", type=int, default=0, help="timed calls per op")
    bench.add_argument("--seed", type=int, default=0)
    bench.add_argument(
        "--timeout",
        type=float,
        default=900,
        help="seconds per frontend before the run is abandoned",
    )
    bench.add_argument("--out", default="fused_a2a_out")
    chk = sub.add_parser("check", help="verify this machine: build, devices, a small round trip")
    chk.add_argument("--timeout", type=float, default=300)
    rep = sub.add_parser("report", help="Markdown tables of bench JSON files")
    rep.add_argument("files", nargs="+")
    args = parser.parse_args(argv)
    if args.command == "bench":
        return cmd_bench(args)
    if args.command == "report":
        for path in args.files:
            with open(path) as f:
                print(report.markdown(json.load(f), path) + "\n")
        return 0
    return check.cmd_check(args)


if __name__ == "__main__":
    sys.exit(main())
