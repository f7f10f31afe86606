"""One process of a multi-process JAX run (jax.distributed; CPU devices, or GPUs with
FA2A_MP_LOCAL_DEVICES); see test_jax_misc.py and test_gpu_jax_multiprocess.py.

    python tests/jax_mp_worker.py PROCESS_ID NUM_PROCESSES PORT

The parent sets XLA_FLAGS (local CPU device count) and FUSED_A2A_TIMEOUT_S. Each process builds the
same global inputs, runs the ops over meshes whose EP groups span the processes, and checks the
rows it holds against the NumPy reference. Last stdout line: RESULTS <json>.
"""

from __future__ import annotations

import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from jax_cases import _run, run_normal_case  # noqa: E402
from jax_cases_hybrid import hybrid_cases, run_hybrid_case  # noqa: E402
from jax_cases_misc import _multi_axis_step  # noqa: E402


def main():
    pid, nproc, port = (int(a) for a in sys.argv[1:4])
    import jax

    # On GPUs (tests/test_gpu_jax_multiprocess.py) each process drives its own GPUs of the host,
    # all of them visible (CUDA IPC between the processes, as torch's ranks)
    local = os.environ.get("FA2A_MP_LOCAL_DEVICES")
    jax.distributed.initialize(
        coordinator_address=f"127.0.0.1:{port}",
        num_processes=nproc,
        process_id=pid,
        initialization_timeout=60,
        local_device_ids=[int(d) for d in local.split(",")] if local else None,
    )
    from jax.sharding import Mesh

    devs = sorted(jax.devices(), key=lambda d: (d.process_index, d.id))
    g = len(devs)
    assert len(jax.local_devices()) * nproc == g, (jax.local_devices(), g)
    interleaved = [devs[(i % nproc) * (g // nproc) + i // nproc] for i in range(g)]
    results = {}
    for name, order in (("blocked", devs), ("interleaved", interleaved)):
        mesh = Mesh(np.array(order), ("ep",))
        for dt, routing, seed in (
            ("bf16", "random", 1),
            ("f32", "overflow", 2),
            ("f16", "empty_ranks", 3),
        ):
            results[f"{name}-{dt}-{routing}"] = _run(
                run_normal_case, mesh, dict(dtype=dt, routing=routing, seed=seed)
            )
        for case_name, case in hybrid_cases(g).items():  # HybridEP across the processes
            if any(k in case_name for k in ("pad16-overflow", "f16-l3", "fp8-quant-l2")):
                results[f"{name}-hybrid-{case_name}"] = _run(run_hybrid_case, mesh, case)
    # (dp, ep) with every EP group spanning the processes, and with groups inside one process
    grid = np.array(devs).reshape(nproc, g // nproc)
    results["dp-ep-groups-span-processes"] = _run(_multi_axis_step, grid.T.copy())
    results["dp-ep-groups-in-one-process"] = _run(_multi_axis_step, grid)
    print("RESULTS " + json.dumps(results), flush=True)
    jax.distributed.shutdown()


if __name__ == "__main__":
    main()
