"""benchmarks/host_profile.py on CPU ranks: every op timed --repeat times (medians and the runs),
and the Megatron helpers under both torch routes (FUSED_A2A_TORCH_DIRECT=1 / 0) in one process."""

from __future__ import annotations

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_host_profile_times_both_routes(tmp_path):
    out = tmp_path / "hp.json"
    cmd = [
        sys.executable, os.path.join(ROOT, "benchmarks", "host_profile.py"), "--cpu",
        "--world", "2", "--tokens", "8", "--hidden", "256", "--experts", "16", "--topk", "2",
        "--calls", "3", "--profiles", "0", "--repeat", "2", "--out", str(out),
    ]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k != "FUSED_A2A_TORCH_DIRECT"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    ops = json.loads(out.read_text())["ops"]
    for helper in ("fused_dispatch", "fused_dispatch (grad)", "fused_combine"):
        assert helper not in ops, helper
        for route in ("[direct]", "[op route]"):
            row = ops[f"{helper} {route}"]
            assert len(row["host_us_runs"]) == 2 and row["host_us"] > 0, row
    assert len(ops["op combine"]["wall_us_runs"]) == 2
    # the core's host phases are CUDA buffers' (fused_a2a_core.cuda_host_phases): none on CPU
    assert not [name for name, row in ops.items() if "core_phases" in row]


def test_core_host_phases_are_empty_for_cpu_buffers():
    """fused_a2a_core.cuda_host_phases reads a CUDA buffer's host time by phase; a CPU buffer has
    none (empty), and a group id with no buffer is an error naming it."""
    import pytest
    import raw_core as rc

    import fused_a2a_core as core

    with rc.ThreadGroup(2, 1 << 16) as tg:
        assert core.cuda_host_phases(tg.gid, 0) == []
        with pytest.raises(RuntimeError, match=f"no buffer for group {tg.gid + 1000}"):
            core.cuda_host_phases(tg.gid + 1000, 0)


def test_hybrid_kernels_script_runs_on_cpu(tmp_path):
    """benchmarks/hybrid_kernels.py (kernel times of the torch HybridEP ops on GPUs) runs its ops
    on CPU ranks too, so the script is checked here; it records no kernels there."""
    out = tmp_path / "hk.json"
    cmd = [
        sys.executable, os.path.join(ROOT, "benchmarks", "hybrid_kernels.py"), "--world", "2",
        "--tokens", "16", "--hidden", "256", "--experts", "8", "--top-k", "2", "--out", str(out),
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    result = json.loads(out.read_text())
    assert result["device"] == "cpu" and result["world"] == 2, result
    for op in ("dispatch (dynamic P)", "dispatch (static P)", "combine"):
        assert result[op] == [], (op, result[op])
