"""JAX HybridEP mode (hybrid_dispatch / hybrid_combine) vs the NumPy reference, bit for bit, on 2,
3, 4 and 8 CPU devices: permuted rows, probs, tokens_per_expert, row map, padding rows, overflow,
combine (with and without probs), both VJPs and value_and_grad, pad_multiple in {None, 0, 16, 64},
P exact / with slack / overflowing / zero, bf16 / f16 / f32, FP8 (quantised: e4m3 rows and scales;
e4m3 passed through); plus HLO, bad inputs, checkify, jit boundaries, vmap, (dp, ep) meshes,
normal mode in the same program, checkpoint, N = 0, buffer growth, the dropless round trip. Each
device count runs in one child process (tests/jax_cases.py)."""

from __future__ import annotations

import pytest
from jax_cases_hybrid import hybrid_cases
from jax_cases_hybrid_misc import SUITE_HYBRID_MISC
from jax_harness import check, require_jax, run_suite

CASES = [(g, name) for g in (2, 3, 4, 8) for name in hybrid_cases(g)]


@pytest.mark.parametrize("g,name", CASES, ids=[name for _, name in CASES])
def test_hybrid(g, name):
    require_jax()
    check(run_suite("hybrid", str(g)), name)


def test_hybrid_small_rounds():
    """FUSED_A2A_BUFFER_ROWS=1: the smallest buffers, so every op takes many rounds."""
    require_jax()
    results = run_suite("hybrid", "3", env_items=(("FUSED_A2A_BUFFER_ROWS", "1"),))
    bad = {k: v for k, v in results.items() if v != "ok"}
    assert not bad, "\n".join(f"{k}: {v}" for k, v in bad.items())


@pytest.mark.parametrize("name", sorted(SUITE_HYBRID_MISC))
def test_hybrid_misc(name):
    require_jax()
    check(run_suite("hybrid_misc"), name)
