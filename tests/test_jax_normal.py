"""JAX normal mode vs the NumPy reference, bit for bit: 2, 3, 4 and 8 CPU devices, bf16 / fp16 /
fp32, random routing, ranks that receive nothing, all -1 routing, K in {1, 8}, capacity overflow,
several exchange rounds; forward, both VJPs and value_and_grad. Each device count runs in one child
process (tests/jax_cases.py)."""

from __future__ import annotations

import pytest
from jax_cases import normal_cases
from jax_harness import check, require_jax, run_suite

CASES = [(g, name) for g in (2, 3, 4, 8) for name in normal_cases(g)]


@pytest.mark.parametrize("g,name", CASES, ids=[name for _, name in CASES])
def test_normal(g, name):
    require_jax()
    check(run_suite("normal", str(g)), name)


def test_normal_one_row_per_round():
    """FUSED_A2A_BUFFER_ROWS=1: buffers hold one row per peer, so every op takes many rounds."""
    require_jax()
    results = run_suite("normal", "3", env_items=(("FUSED_A2A_BUFFER_ROWS", "1"),))
    bad = {k: v for k, v in results.items() if v != "ok"}
    assert not bad, "\n".join(f"{k}: {v}" for k, v in bad.items())
