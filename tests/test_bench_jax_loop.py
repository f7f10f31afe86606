"""The JAX bench's timing loops (fused_a2a/bench_jax.py): each loop count is its own program, so
XLA knows the trip count and XLA:GPU runs the loop without a host synchronisation per iteration;
FUSED_A2A_BENCH_JAX_COUNT=runtime (the A/B) passes the count as an operand. Checked in the
optimized HLO of a looped normal-mode combine on two CPU devices. The loops are timed by two
device clock reads (jax_fused_a2a.read_clock) around the timed calls: the reads must enclose the
work between them and Bench.time_loop must report their interval per call."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest
from conftest import gpu_count

pytestmark = pytest.mark.skipif(importlib.util.find_spec("jax") is None, reason="needs jax")

_CHILD = r"""
import json, re, sys, time
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
            clocks=len(re.findall(r'custom_call_target="fa2a_read_clock', text)),
        )

# read_clock encloses the work that depends on its first read and that the second read depends on.
def between(work):
    def f(a):
        a, t0 = fa.read_clock(a)
        for _ in range(work):
            a = jax.numpy.tanh(a @ a)
        a, t1 = fa.read_clock(a)
        return jax.numpy.concatenate([t0, t1])
    return b.smap(f, 1)

from fused_a2a.bench_jax import _slowest_interval_ns
m = b.put([np.eye(256, dtype=np.float32) for _ in range(2)])
intervals = {}
for work in (0, 40):
    prog_w = between(work)
    jax.block_until_ready(prog_w(m))
    clocks = np.asarray(prog_w(m))
    intervals[work] = _slowest_interval_ns(clocks, 2)
t0 = time.perf_counter()
jax.block_until_ready(between(40)(m))
device_us, host_us = b.time_loop(prog, (x, idx, w))
print("RESULT " + json.dumps(dict(static=hasattr(prog, "programs"), programs=out,
      intervals=intervals, dtype=str(clocks.dtype), shape=list(clocks.shape),
      device_us=device_us, host_us=host_us)))
"""


def _run(extra_env, platform="cpu"):
    env = {k: v for k, v in os.environ.items() if k != "FUSED_A2A_BENCH_JAX_COUNT"}
    env.update(JAX_PLATFORMS=platform, **extra_env)
    if platform == "cpu":
        env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
    else:  # the first two GPUs; the buffers are allocated outside XLA's pool
        env.update(XLA_PYTHON_CLIENT_PREALLOCATE="false", FUSED_A2A_TIMEOUT_S="60")
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
    # The untimed first call and the timed one stay apart (XLA must not merge the two combines
    # of the same values: the clock read between them passes the carry through).
    assert one["calls"] == 2 and one["trip"] in ([], ["1"]), one
    assert five["clocks"] == 2 and one["clocks"] == 2, (five, one)


@pytest.mark.parametrize("platform", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_clock_reads_enclose_the_work_and_time_the_loop(platform):
    if platform == "cuda" and gpu_count() < 2:
        pytest.skip(f"needs 2 CUDA GPUs, {gpu_count()} visible")
    res = _run({}, platform)
    assert res["dtype"] == "uint32" and res["shape"] == [2 * 4], res  # 2 devices x [t0, t1]
    idle, busy = res["intervals"]["0"], res["intervals"]["40"]
    # 40 dependent 256 x 256 matmuls (and tanh passes) take milliseconds on CPU and tens of
    # microseconds on a GPU (40 x 2 kernels); nothing between the reads takes much less.
    floor = 1_000_000 if platform == "cpu" else 20_000
    assert 0 <= idle < busy and busy > floor, res["intervals"]
    assert res["device_us"] > 0 and res["host_us"] >= 0, res


def test_runtime_count_ab_keeps_one_program():
    res = _run({"FUSED_A2A_BENCH_JAX_COUNT": "runtime"})
    assert not res["static"] and res["programs"] == {}, res
