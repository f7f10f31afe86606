"""Run JAX scenarios in child processes (so that XLA_FLAGS, the CPU device count and JAX's global
state never leak into the torch tests of the same pytest session), with hard timeouts."""

from __future__ import annotations

import functools
import json
import os
import socket
import subprocess
import sys

import pytest

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
REPO_ROOT = os.path.dirname(TESTS_DIR)


@functools.cache
def jax_ready() -> str:
    """'' when jax and an XLA-FFI build of fused_a2a_core are importable, else the reason."""
    code = (
        "import jax, fused_a2a_core as c; "
        "assert c.ffi_targets('cpu'), 'fused_a2a_core was built without XLA FFI handlers'"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], env=child_env(1), capture_output=True, text=True, timeout=120
    )
    return "" if proc.returncode == 0 else (proc.stderr.strip().splitlines() or ["?"])[-1]


def require_jax():
    reason = jax_ready()
    if reason:
        pytest.skip(f"JAX frontend unavailable: {reason}")


def child_env(num_devices: int, extra: dict | None = None) -> dict:
    env = dict(os.environ)
    env["XLA_FLAGS"] = (
        env.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={num_devices}"
    ).strip()
    env["JAX_PLATFORMS"] = "cpu"
    env.setdefault("FUSED_A2A_TIMEOUT_S", "30")
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (env.get("PYTHONPATH", ""), REPO_ROOT, TESTS_DIR) if p
    )
    env.update(extra or {})
    return env


def _parse(proc, what: str) -> dict:
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("RESULTS "):
            return json.loads(line[len("RESULTS ") :])
    tail = (proc.stdout + proc.stderr)[-6000:]
    raise AssertionError(f"{what} exited with {proc.returncode} without results:\n{tail}")


@functools.cache
def run_suite(suite: str, arg: str = "", env_items: tuple = (), timeout: float = 600) -> dict:
    """{case: 'ok' | error text} of one suite of tests/jax_cases.py, run once per session."""
    cmd = [sys.executable, os.path.join(TESTS_DIR, "jax_cases.py"), suite] + ([arg] if arg else [])
    try:
        proc = subprocess.run(
            cmd,
            env=child_env(8, dict(env_items)),
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=TESTS_DIR,
        )
    except subprocess.TimeoutExpired as e:
        raise AssertionError(f"JAX suite {suite} {arg} did not finish in {timeout} s") from e
    return _parse(proc, f"JAX suite {suite} {arg}")


def check(results: dict, name: str):
    assert name in results, f"case {name} did not run: {sorted(results)}"
    if results[name] != "ok":
        pytest.fail(f"{name}: {results[name]}", pytrace=False)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_processes(
    script: str,
    num_processes: int,
    local_devices: int,
    timeout: float = 300,
    extra_env: dict | None = None,
    process_env=None,
):
    """Start `script PROCESS_ID NUM_PROCESSES PORT` in `num_processes` processes; -> results of
    each. Every process is killed if the group has not finished within `timeout` seconds.
    extra_env: for every process (after child_env's); process_env(p): process p's own."""
    port = free_port()
    env = child_env(local_devices, extra_env)
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                os.path.join(TESTS_DIR, script),
                str(p),
                str(num_processes),
                str(port),
            ],
            env=dict(env, **(process_env(p) if process_env else {})),
            cwd=TESTS_DIR,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for p in range(num_processes)
    ]
    outputs = []
    try:
        for p in procs:
            out, err = p.communicate(timeout=timeout)
            outputs.append(subprocess.CompletedProcess(p.args, p.returncode, out, err))
    except subprocess.TimeoutExpired as e:
        raise AssertionError(f"{script}: processes did not finish within {timeout} s") from e
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return [_parse(o, f"{script} process {i}") for i, o in enumerate(outputs)]
