"""Shared pytest setup: markers, and tests/ on sys.path (`import reference`, `import mp`).

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
