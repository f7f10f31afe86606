"""The command line: ``fused-a2a check`` and a small ``fused-a2a bench`` on CPU ranks (both
frontends, both modes, the peers), every row verified bit for bit, JSON and PNG written."""

from __future__ import annotations

import importlib.metadata
import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _cli(*args, timeout=300):
    env = dict(os.environ, FUSED_A2A_TIMEOUT_S="60")
    env.pop("XLA_FLAGS", None)
    return subprocess.run(
        [sys.executable, "-m", "fused_a2a.cli", *args],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_console_script_declared():
    scripts = {ep.name: ep.value for ep in importlib.metadata.entry_points(group="console_scripts")}
    assert scripts.get("fused-a2a") == "fused_a2a.cli:main"


def test_check():
    proc = _cli("check")
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:]
    assert "build:" in out and "round trips" in out
    assert "torch cpu normal       ok" in out and "torch cpu hybrid       ok" in out
    if importlib.util.find_spec("jax") is not None:
        assert "jax cpu normal         ok" in out, out[-3000:]


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench_out")
    proc = _cli(
        "bench",
        "--device",
        "cpu",
        "--ranks",
        "2",
        "--tokens",
        "16",
        "48",
        "--hidden",
        "128",
        "--experts",
        "8",
        "--topk",
        "3",
        "--iters",
        "2",
        "--out",
        str(out),
    )
    return proc, out


def test_bench_runs_and_writes(bench):
    proc, out = bench
    text = proc.stdout + proc.stderr
    assert proc.returncode == 0, text[-8000:]
    assert (out / "bench.png").stat().st_size > 10_000
    doc = json.loads((out / "bench.json").read_text())
    assert doc["meta"]["config"]["ranks"] == 2 and doc["meta"]["config"]["tokens"] == [16, 48]
    assert not doc["errors"], doc["errors"]
    assert "sweep of N" in text and "[########################]" in text


def test_bench_rows_all_verified(bench):
    _, out = bench
    doc = json.loads((out / "bench.json").read_text())
    rows = doc["rows"]
    assert rows and all(r["verified"] for r in rows)
    have = {(r["frontend"], r["impl"], r["mode"], r["op"], r["tokens"]) for r in rows}
    frontends = ["torch"] + (["jax"] if importlib.util.find_spec("jax") else [])
    for fe in frontends:
        for mode in ("normal", "hybrid"):
            for op in ("dispatch", "combine", "dispatch_bwd", "combine_bwd"):
                for n in (16, 48):
                    assert (fe, "fused_a2a", mode, op, n) in have, (fe, mode, op, n)
    for n in (16, 48):  # HybridEP FP8 dispatch (e4m3 + scales), torch
        assert ("torch", "fused_a2a", "hybrid", "dispatch_fp8", n) in have, n
    assert ("torch", "all_to_all_single", "rows", "dispatch", 48) in have
    # the baseline HybridEP is compared with: normal mode + a separate permute / unpermute
    for op in ("dispatch", "combine"):
        assert ("torch", "fused_a2a normal+permute", "hybrid", op, 48) in have, op
    if "jax" in frontends:
        assert ("jax", "all_to_all (padded)", "rows", "combine", 48) in have
    for r in rows:
        assert r["time_us"] > 0 and r["gbps"] > 0 and r["wire_gbps"] >= 0
        if not r["peer"]:
            assert set(r["vs"]) >= {"torch a2a"}, r["vs"]
        if r["mode"] == "hybrid" and not r["peer"]:
            assert "torch fused_a2a normal+permute" in r["vs"], r["vs"]


def test_bench_table_rows_say_verified(bench):
    proc, _ = bench
    lines = proc.stdout.splitlines()
    start = next(i for i, ln in enumerate(lines) if ln.startswith("implementation"))
    table = []
    for ln in lines[start + 2 :]:
        if not ln.strip():
            break
        table.append(ln)
    assert len(table) >= 8, "\n".join(lines)
    assert all(ln.rstrip().endswith("yes") for ln in table), "\n".join(table)


def test_bench_rejects_bad_arguments():
    proc = _cli("bench", "--device", "cpu", "--ranks", "3", "--experts", "8", "--out", "/tmp/x")
    assert proc.returncode != 0
    assert "--experts 8 must be a multiple of --ranks 3" in proc.stdout + proc.stderr


def test_report_renders_markdown(bench, tmp_path):
    _, out = bench
    normal_style = {
        "meta": {"world": 4, "device": "GPU", "date": "today"},
        "results": [
            {
                "case": "standard",
                "n": 4096,
                "sms": 24,
                "exact_all_ranks": True,
                "combine_us": 10.0,
                "combine_deepep_GBps": 1.0,
                "combine_wire_GBps": 0.5,
                "nccl_a2a_us": 20.0,
                "nccl_a2a_deepep_GBps": 0.5,
            }
        ],
    }
    other = tmp_path / "normal.json"
    other.write_text(json.dumps(normal_style))
    proc = _cli("report", str(out / "bench.json"), str(other), timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "| torch fused_a2a normal | dispatch |" in proc.stdout
    assert "| standard (N=4096) | combine | 10.0 | 1.0 | 0.5 | 24 | 2.00 | yes |" in proc.stdout


def test_link_ceiling_shares_and_an_unmeasured_ceiling():
    """Issue 7's ceiling in the bench: each row's wire GB/s as a share of the ceiling at its SM
    count; where the probe cannot run (no CUDA here, or a CPU build), the entry says why."""
    from fused_a2a.cli import add_ceiling_shares, link_ceilings

    rows = [
        {"sms": 24, "wire_gbps": 300.0},
        {"sms": 48, "wire_gbps": 310.0},
        {"sms": "-", "wire_gbps": 305.0},  # NCCL: no SM count, no share
    ]
    add_ceiling_shares(rows, [{"sms": 24, "GBps": 320.0}, {"sms": 48, "error": "x"}])
    assert rows[0]["of_ceiling"] == round(300.0 / 320.0, 3)
    assert "of_ceiling" not in rows[1] and "of_ceiling" not in rows[2]
    import fused_a2a_core as core

    if core.cuda_device_count() < 2:
        (entry,) = link_ceilings(2, [24], timeout=60)
        assert entry["sms"] == 24 and "GBps" not in entry and entry["error"], entry
