"""JAX over several processes on GPUs (jax.distributed, one host): every process drives its own
GPUs and the EP groups span the processes, so the buffers connect through CUDA IPC (issue 4's
"multi-process JAX" transport). The cases are the CPU multi-process test's (tests/jax_mp_worker.py:
normal mode in three dtypes and routings over blocked and interleaved meshes, HybridEP, (dp, ep)
meshes with groups across and inside the processes), each checked against the NumPy reference by
the process that holds the rows.

Skipped unless enough CUDA GPUs are visible.
"""

from __future__ import annotations

import os

import pytest
from conftest import gpu_count
from jax_harness import run_processes

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("processes,per_process", [(2, 1), (2, 2)], ids=["2x1", "2x2"])
def test_jax_multiprocess_on_gpus(processes, per_process):
    need = processes * per_process
    if gpu_count() < need:
        pytest.skip(f"needs {need} CUDA GPUs, {gpu_count()} visible")
    env = {
        "JAX_PLATFORMS": "cuda",
        "XLA_PYTHON_CLIENT_PREALLOCATE": "false",
        "FUSED_A2A_TIMEOUT_S": os.environ.get("FA2A_GPU_TEST_TIMEOUT_S", "60"),
        "NCCL_NVLS_ENABLE": "0",
    }
    per_process_results = run_processes(
        "jax_mp_worker.py",
        num_processes=processes,
        local_devices=per_process,
        timeout=400,
        extra_env=env,
        process_env=lambda p: {
            "FA2A_MP_LOCAL_DEVICES": ",".join(str(p * per_process + i) for i in range(per_process))
        },
    )
    for i, results in enumerate(per_process_results):
        assert results, f"process {i} ran no case"
        bad = {k: v for k, v in results.items() if v != "ok"}
        assert not bad, f"process {i}:\n" + "\n".join(f"{k}: {v}" for k, v in bad.items())
