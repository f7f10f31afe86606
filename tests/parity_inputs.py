"""Inputs shared by the torch and JAX halves of tests/test_parity.py (NumPy only)."""

from __future__ import annotations

import ml_dtypes
import numpy as np

DTYPES = {"bf16": ml_dtypes.bfloat16, "f16": np.float16, "f32": np.float32}


def make(rank: int, n: int, h: int, k: int, e: int, dtype_name: str, seed: int) -> dict:
    """x [N,H] (dtype), topk_idx [N,K] int32 with -1 slots, topk_weights [N,K] f32, and the
    upstream gradient grad_out [N,H] f32 of the loss sum(out * grad_out) + sum(recv_weights^2)."""
    rng = np.random.default_rng([seed, rank])
    idx = np.stack([rng.permutation(e)[:k] for _ in range(n)]).astype(np.int32)
    idx[rng.random(idx.shape) < 0.25] = -1
    return {
        "x": rng.standard_normal((n, h)).astype(np.float32).astype(DTYPES[dtype_name]),
        "topk_idx": idx,
        "topk_weights": rng.random((n, k)).astype(np.float32),
        "grad_out": rng.standard_normal((n, h)).astype(np.float32),
    }


def make_fp8(rank: int, n: int, h: int, k: int, e: int, seed: int) -> dict:
    """FP8 rows of one rank: x [N,H] e4m3 (finite values: bits 0..126, as uint8), x_scales
    [N,H/128] f32, topk_idx [N,K] int32 with -1 slots, topk_weights [N,K] f32."""
    rng = np.random.default_rng([seed, rank, 8])
    base = make(rank, n, h, k, e, "f32", seed)
    return {
        "x_bits": rng.integers(0, 0x7F, (n, h), dtype=np.uint8),
        "x_scales": rng.random((n, h // 128)).astype(np.float32),
        "topk_idx": base["topk_idx"],
        "topk_weights": base["topk_weights"],
    }


def make_hybrid(rank: int, n: int, h: int, e: int, p: int, dtype_name: str, seed: int) -> dict:
    """HybridEP inputs of one rank: x [N,H] (dtype), routing_map [N,E] bool (2 experts per token,
    some tokens routed nowhere), probs [N,E] f32, and the upstream gradients of the loss
    sum(out * grad_out) + sum(dispatched_probs * grad_probs): grad_out [N,H] f32, grad_probs [P]."""
    rng = np.random.default_rng([seed, rank, 1])
    rm = np.zeros((n, e), bool)
    for t in range(n):
        if rng.random() >= 0.15:
            rm[t, rng.permutation(e)[:2]] = True
    return {
        "x": rng.standard_normal((n, h)).astype(np.float32).astype(DTYPES[dtype_name]),
        "routing_map": rm,
        "probs": rng.uniform(0.01, 1.0, (n, e)).astype(np.float32),
        "grad_out": rng.standard_normal((n, h)).astype(np.float32),
        "grad_probs": rng.standard_normal(p).astype(np.float32),
    }
