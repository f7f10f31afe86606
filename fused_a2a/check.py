"""``fused-a2a check``: what works on this machine.

Build info, versions, devices, GPU peer access (and the NVLink topology from nvidia-smi), then a
small dispatch/combine round trip, forward and backward, in both modes through each frontend on
each backend present (torch: 2 rank processes; JAX: 2 devices of one process), every output
checked bit for bit against the NumPy computation of fused_a2a/routing.py.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess

from fused_a2a import bench_report as report
from fused_a2a._common import build_info

SMALL = dict(
    ranks=2,
    tokens=[16],
    standard=16,
    hidden=256,
    topk=4,
    experts=8,
    dtype="bf16",
    seed=1,
    iters=0,
    warmup=0,
    reps=1,
    units=["fused_normal", "fused_hybrid"],
)


def _peer_access(n: int) -> list[str]:
    import torch

    lines = ["peer access (torch.cuda.can_device_access_peer), row -> column:"]
    lines.append("       " + " ".join(f"{j:>5}" for j in range(n)))
    for i in range(n):
        cells = [
            "    -"
            if i == j
            else f"{'yes' if torch.cuda.can_device_access_peer(i, j) else 'NO':>5}"
            for j in range(n)
        ]
        lines.append(f"  GPU{i:<2} " + " ".join(cells))
    smi = shutil.which("nvidia-smi")
    if smi:
        try:
            topo = subprocess.run(
                [smi, "topo", "-m"], capture_output=True, text=True, timeout=30
            ).stdout
            lines.append("nvidia-smi topo -m (NV# = NVLink):")
            lines += ["  " + ln for ln in topo.splitlines()[: n + 1]]
        except (OSError, subprocess.SubprocessError) as err:
            lines.append(f"nvidia-smi topo -m failed: {err}")
    return lines


def _status(results: list[dict], unit: str) -> str:
    res = next((r for r in results if r["unit"] == unit), None)
    if res is None:
        return "not run"
    if "unsupported" in res:
        return "unsupported: " + res["unsupported"].splitlines()[0][:200]
    if "error" in res:
        return "ERROR: " + res["error"].splitlines()[0][:300]
    bad = [op for op, v in res["ops"].items() if op != "sms" and not v[1]]
    return "ok (forward and backward, bit for bit)" if not bad else "MISMATCH in " + ", ".join(bad)


def cmd_check(args) -> int:
    from fused_a2a import cli

    info = build_info()
    print("build:", json.dumps(info))
    print("versions:", json.dumps(cli._versions()))
    gpus = cli.gpu_count()
    print(
        f"devices: {os.cpu_count()} CPU cores; {info.get('cuda_devices', 0)} CUDA GPU(s) "
        f"visible to the core{'' if info.get('cuda') else ' (CPU-only build)'}"
    )
    if gpus:
        try:
            import torch

            for i in range(torch.cuda.device_count()):
                print(f"  GPU{i}: {torch.cuda.get_device_name(i)}")
            if torch.cuda.device_count() >= 2:
                print("\n".join(_peer_access(torch.cuda.device_count())))
        except Exception as err:  # noqa: BLE001 - reported
            print(f"  torch cannot list the GPUs: {type(err).__name__}: {err}")
    os.environ.setdefault("FUSED_A2A_TIMEOUT_S", "30")
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    checks = []
    devices = ["cpu"] + (["cuda"] if gpus >= 2 else [])
    jax_reason = cli.jax_available()
    for device in devices:
        spec = dict(SMALL, device=device)
        try:
            per_rank = cli.run_torch(spec, 2, args.timeout)
            merged = report.merge_ranks(per_rank)
            checks += [(f"torch {device} {u[6:]}", _status(merged, u)) for u in SMALL["units"]]
        except Exception as err:  # noqa: BLE001 - reported
            checks.append((f"torch {device}", f"ERROR: {type(err).__name__}: {err}"[:600]))
        if jax_reason:
            checks.append((f"jax {device}", f"unsupported: {jax_reason}"))
            continue
        try:
            doc = cli.run_jax(spec, device, args.timeout)
            checks += [
                (f"jax {device} {u[6:]}", _status(doc["results"], u)) for u in SMALL["units"]
            ]
        except Exception as err:  # noqa: BLE001 - reported
            checks.append((f"jax {device}", f"ERROR: {type(err).__name__}: {err}"[:600]))
    if gpus < 2:
        checks.append(("torch/jax cuda", "not run: needs >= 2 GPUs visible to a CUDA build"))
    print("round trips (2 ranks, dispatch + combine, forward + backward, vs NumPy):")
    for name, status in checks:
        print(f"  {name:22} {status}")
    failed = [n for n, s in checks if s.startswith(("ERROR", "MISMATCH"))]
    works = [n for n, s in checks if s.startswith("ok")]
    print(f"works: {', '.join(works) if works else 'nothing'}")
    if failed:
        print(f"FAILED: {', '.join(failed)}")
    return 1 if failed or not works else 0
