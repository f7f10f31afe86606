"""The JAX bench's timing loops (fused_a2a/bench_jax.py): each loop count is its own program, so
XLA knows the trip count and XLA:GPU runs the loop without a host synchronisation per iteration;
FUSED_A2A_BENCH_JAX_COUNT=runtime (the A/B) passes the count as an operand. Checked in the
optimized HLO of a looped normal-mode combine on two CPU devices."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(importlib.util.find_spec("jax") is None, reason="needs jax")

_CHILD = r"""
import json, re, sys
import numpy as np
import jax
from fused_a2a.bench_jax import Bench, _loop
import jax_fused_a2a as fa

b = Bench({"ranks": 2, "iters": 3, "reps": 1})
n, h, k, e = 8, 16, 2, 4
rng = np.random.default_rng(0)
x = b.put([rng.standard_normal((n, h)).astype(np.float32) for _ in range(2)])
idx = b.put([rng.integers(0, e, (n, k)).astype(np.int32) for _ in range(2)])
w = b.put([rng.random((n, k)).astype(np.float32) for _ in range(2)])

def t_combine(count, x, idx, w):
    d = fa.dispatch(x, idx, w, num_experts=e, axis_name="ep")
    return _loop(count, lambda y: fa.combine(y, d.handle, axis_name="ep"), d.recv_x)

prog = b.smap(t_combine, 3, True)
out = {}
for count in (1, 5):
    jax.block_until_ready(prog(count, x, idx, w))
    if hasattr(prog, "programs"):
        text = prog.programs[count].lower(x, idx, w).compile().as_text()
        out[count] = dict(
            loops=len(re.findall(r"\bwhile\(", text)),
            trip=re.findall(r'"known_trip_count":\{"n":"(\d+)"\}', text),
            calls=len(re.findall(r'custom_call_target="fa2a_combine', text)),
        )
print("RESULT " + json.dumps(dict(static=hasattr(prog, "programs"), programs=out)))
"""


def _run(extra_env):
    env = {k: v for k, v in os.environ.items() if k != "FUSED_A2A_BENCH_JAX_COUNT"}
    env.update(JAX_PLATFORMS="cpu", **extra_env)
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
    proc = subprocess.run(
        [sys.executable, "-c", _CHILD], env=env, capture_output=True, text=True, timeout=300
    )
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT ") :])
    raise AssertionError(f"child exited {proc.returncode}:\n{(proc.stdout + proc.stderr)[-4000:]}")


def test_loop_counts_are_compile_time_trip_counts():
    res = _run({})
    assert res["static"], res
    five = res["programs"]["5"]
    assert five["loops"] == 1 and five["trip"] == ["5"], five
    assert five["calls"] >= 1, f"the combine left the loop: {five}"
    one = res["programs"]["1"]
    assert one["calls"] >= 1 and one["trip"] in ([], ["1"]), one


def test_runtime_count_ab_keeps_one_program():
    res = _run({"FUSED_A2A_BENCH_JAX_COUNT": "runtime"})
    assert not res["static"] and res["programs"] == {}, res
