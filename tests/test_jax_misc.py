"""JAX frontend: HLO has our custom calls and no XLA collectives, no retrace, trace-time errors
for bad inputs, vmap, checkify overflow check, (dp, ep) meshes, handles across jit boundaries,
layout, buffer growth, int64 indices, a bad index on one rank, and 2 processes x 2 CPU devices."""

from __future__ import annotations

import pytest
from jax_cases_misc import SUITE_MISC
from jax_harness import check, require_jax, run_processes, run_suite


@pytest.mark.parametrize("name", sorted(SUITE_MISC))
def test_misc(name):
    require_jax()
    check(run_suite("misc"), name)


def test_buffer_growth():
    require_jax()
    check(run_suite("growth", env_items=(("FUSED_A2A_BUFFER_ROWS", "1"),)), "growth")


def test_int64_indices():
    require_jax()
    check(run_suite("int64", env_items=(("JAX_ENABLE_X64", "1"),)), "int64")


def test_bad_index_on_one_rank_is_a_bounded_error():
    require_jax()
    results = run_suite("bad_value", env_items=(("FUSED_A2A_TIMEOUT_S", "5"),), timeout=120)
    check(results, "bad_value_one_rank")


def test_two_processes_two_devices_each():
    require_jax()
    per_process = run_processes("jax_mp_worker.py", num_processes=2, local_devices=2)
    for i, results in enumerate(per_process):
        bad = {k: v for k, v in results.items() if v != "ok"}
        assert not bad, f"process {i}:\n" + "\n".join(f"{k}: {v}" for k, v in bad.items())
