"""Shared pytest setup: markers, tests/ on sys.path (`import reference`, `import mp`), and a check
at the end of the session that no test left a shared-memory segment of the core in /dev/shm.

Nothing here imports fused_a2a_core, torch_fused_a2a or jax_fused_a2a: collecting the tests must
work before (and without) the compiled core.
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
import sys

import pytest

_TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
if _TESTS_DIR not in sys.path:
    sys.path.insert(0, _TESTS_DIR)


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "gpu: needs CUDA GPUs; skipped only when neither torch nor the driver sees one"
    )
    config.addinivalue_line("markers", "slow: long-running test (minutes)")


@functools.cache
def gpu_count() -> int:
    """Number of CUDA GPUs visible, without initialising JAX (which would grab GPU memory)."""
    try:
        import torch

        if torch.cuda.is_available():
            return torch.cuda.device_count()
    except Exception:
        pass
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return 0
    try:
        out = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=30).stdout
    except Exception:
        return 0
    return sum(1 for line in out.splitlines() if line.startswith("GPU "))


def pytest_collection_modifyitems(config, items):
    gpu_items = [item for item in items if item.get_closest_marker("gpu") is not None]
    if not gpu_items or gpu_count() > 0:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (none visible to torch or nvidia-smi)")
    for item in gpu_items:
        item.add_marker(skip)


# ----------------------------------------------------------------------------- /dev/shm check

_SHM_DIR = "/dev/shm"
_segments_at_start: set[str] = set()


def _fa2a_segments() -> set[str]:
    try:
        return {name for name in os.listdir(_SHM_DIR) if name.startswith("fa2a_")}
    except OSError:
        return set()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def pytest_sessionstart(session):
    _segments_at_start.update(_fa2a_segments())


def pytest_sessionfinish(session, exitstatus):
    """Fail the session if a segment appeared during it whose creator is this process or gone
    (names are fa2a_<pid>_...; segments of live processes, e.g. another test session running
    at the same time, are theirs and still in use)."""
    leaked = []
    for name in sorted(_fa2a_segments() - _segments_at_start):
        try:
            pid = int(name.split("_")[1])
        except (IndexError, ValueError):
            continue
        if pid == os.getpid() or not _alive(pid):
            leaked.append(name)
    if leaked:
        reporter = session.config.pluginmanager.get_plugin("terminalreporter")
        text = f"fused_a2a shared-memory segments left in {_SHM_DIR}: {', '.join(leaked)}"
        if reporter is not None:
            reporter.write_line(text, red=True)
        else:
            print(text, file=sys.stderr)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
