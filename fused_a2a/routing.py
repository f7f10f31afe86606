"""Deterministic benchmark/demo inputs and a compact NumPy check of what dispatch/combine return.

Every rank can rebuild every other rank's inputs from the seed, so each rank verifies its own
outputs without any extra communication.
"""

from __future__ import annotations

import numpy as np


def make_inputs(
    rank: int, num_tokens: int, hidden: int, num_topk: int, num_experts: int, seed: int = 0
):
    """DeepSeek-V3-style routing: each token's top-k of uniform random scores.
    Returns (x f32 [N,H], topk_idx int64 [N,K], topk_weights f32 [N,K])."""
    rng = np.random.default_rng([seed, rank])
    x = rng.standard_normal((num_tokens, hidden), dtype=np.float32)
    scores = rng.random((num_tokens, num_experts), dtype=np.float32)
    topk_idx = np.argsort(-scores, axis=1, kind="stable")[:, :num_topk].astype(np.int64)
    topk_weights = np.take_along_axis(scores, topk_idx, axis=1).astype(np.float32)
    return x, topk_idx, topk_weights


def expected_receive(rank: int, num_ranks: int, inputs: list, num_experts: int):
    """(rows of x this rank receives in (source rank, source token) order, [(src, token)])."""
    local = num_experts // num_ranks
    rows, sources = [], []
    for src, (x, topk_idx, _) in enumerate(inputs):
        mask = ((topk_idx >= 0) & (topk_idx // local == rank)).any(axis=1)
        for token in np.nonzero(mask)[0]:
            rows.append(x[token])
            sources.append((src, int(token)))
    hidden = inputs[0][0].shape[1]
    return (np.stack(rows) if rows else np.zeros((0, hidden), np.float32)), sources


def expected_identity_combine(
    rank: int, num_ranks: int, x_rounded: np.ndarray, topk_idx: np.ndarray, num_experts: int
) -> np.ndarray:
    """combine(dispatch(x)) in f32 (before the final rounding): x times the number of ranks that
    received each token, accumulated one rank at a time from zero."""
    local = num_experts // num_ranks
    acc = np.zeros(x_rounded.shape, np.float32)
    for dst in range(num_ranks):
        hit = ((topk_idx >= 0) & (topk_idx // local == dst)).any(axis=1)
        acc[hit] += x_rounded[hit]
    return acc
