"""Deterministic benchmark inputs and a NumPy computation of what every op must return.

Every rank (or the one JAX process) rebuilds every rank's inputs from the seed, so each rank checks
its own outputs bit for bit without extra communication. The expected values follow
SEMANTICS.md directly (no fused_a2a code is used): normal mode rows in (source rank, source token)
order, HybridEP rows expert-major, combines accumulated in float32 in the contract's fixed order
and rounded once. Only NumPy and ml_dtypes are imported.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np

DTYPES = {
    "bf16": np.dtype(ml_dtypes.bfloat16),
    "fp16": np.dtype(np.float16),
    "fp32": np.dtype(np.float32),
}
_UINT = {2: np.uint16, 4: np.uint32}


def make_inputs(
    rank: int,
    num_tokens: int,
    hidden: int,
    num_topk: int,
    num_experts: int,
    seed: int = 0,
    dtype: str = "fp32",
):
    """DeepSeek-V3-style routing: each token's top-k of uniform random scores.

    Returns (x [N,H] in `dtype` (NumPy; bf16 as ml_dtypes.bfloat16), topk_idx int64 [N,K],
    topk_weights f32 [N,K])."""
    rng = np.random.default_rng([seed, rank])
    x = rng.standard_normal((num_tokens, hidden), dtype=np.float32).astype(DTYPES[dtype])
    scores = rng.random((num_tokens, num_experts), dtype=np.float32)
    topk_idx = np.argsort(-scores, axis=1, kind="stable")[:, :num_topk].astype(np.int64)
    topk_weights = np.take_along_axis(scores, topk_idx, axis=1).astype(np.float32)
    return x, topk_idx, topk_weights


def to_routing_map(topk_idx: np.ndarray, topk_weights: np.ndarray, num_experts: int):
    """HybridEP inputs from top-k: (routing_map [N,E] bool, probs [N,E] f32)."""
    n = topk_idx.shape[0]
    routing_map = np.zeros((n, num_experts), bool)
    probs = np.zeros((n, num_experts), np.float32)
    rows, slots = np.nonzero(topk_idx >= 0)
    routing_map[rows, topk_idx[rows, slots]] = True
    probs[rows, topk_idx[rows, slots]] = topk_weights[rows, slots]
    return routing_map, probs


def fp8_rows(n: int, h: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """FP8 bench inputs of one rank, checked as data movement: (bits [n, h] uint8, finite e4m3
    values 0..126, which a bf16 dispatch carries exactly as integers; scales [n, h/128] f32;
    the scales padded with zeros to 16-byte rows, which an f32 dispatch can move)."""
    rng = np.random.default_rng(seed)
    nsc = h // 128
    row_bits = rng.integers(0, 0x7F, (n, h), dtype=np.uint8)
    scales = rng.random((n, nsc), dtype=np.float32)
    return row_bits, scales, np.pad(scales, ((0, 0), (0, -nsc % 4)))


def bits(a: np.ndarray) -> np.ndarray:
    """The raw bits of a float array (for exact comparison, -0.0 and NaN included)."""
    a = np.ascontiguousarray(a)
    return (
        a.view(_UINT[a.dtype.itemsize]) if a.dtype.kind == "f" or a.dtype == DTYPES["bf16"] else a
    )


def same_bits(got, want) -> bool:
    got, want = np.asarray(got), np.asarray(want)
    return (
        got.shape == want.shape
        and got.dtype == want.dtype
        and np.array_equal(bits(got), bits(want))
    )


class Expected:
    """Expected results of every op on every rank for one set of inputs (all ranks' inputs)."""

    def __init__(self, inputs: list, num_experts: int):
        self.inputs = inputs  # [(x, topk_idx, topk_weights)] per rank
        self.g = len(inputs)
        self.e = num_experts
        self.lpr = num_experts // self.g
        self.n, self.h = inputs[0][0].shape
        self.dtype = inputs[0][0].dtype
        # hit[s][:, d]: token of rank s goes to rank d (once, however many experts it picked there)
        self._dst = [np.where(idx >= 0, idx // self.lpr, -1) for _, idx, _ in inputs]
        self.hit = [
            np.stack([(dst == d).any(axis=1) for d in range(self.g)], axis=1) for dst in self._dst
        ]
        self.counts = np.array([h.sum(axis=0) for h in self.hit], np.int64)  # [src, dst] rows

    @classmethod
    def build(cls, world: int, n: int, h: int, k: int, e: int, seed: int, dtype: str):
        return cls([make_inputs(r, n, h, k, e, seed, dtype) for r in range(world)], e)

    # ---- sizes
    def row_bytes(self) -> int:
        return self.h * self.dtype.itemsize

    def recv_rows(self, rank: int) -> int:
        return int(self.counts[:, rank].sum())

    def own_rows(self, rank: int) -> int:
        return int(self.counts[rank, rank])

    # ---- normal mode
    def dispatch(self, rank: int):
        """(recv_x [M,H], recv_topk_idx [M,K] local or -1, recv_topk_weights [M,K] f32,
        tokens_per_expert [L] int64)."""
        xs, idxs, ws = [], [], []
        for src, (x, idx, w) in enumerate(self.inputs):
            sel = self.hit[src][:, rank]
            own = self._dst[src][sel] == rank
            xs.append(x[sel])
            idxs.append(np.where(own, idx[sel] - rank * self.lpr, -1))
            ws.append(np.where(own, w[sel], np.float32(0)).astype(np.float32))
        recv_idx = np.concatenate(idxs)
        per_expert = np.array([(recv_idx == j).sum() for j in range(self.lpr)], np.int64)
        return np.concatenate(xs), recv_idx, np.concatenate(ws), per_expert

    def identity_combine(self, rank: int) -> np.ndarray:
        """combine(dispatch(x)) on `rank`: x summed over the ranks that received each token, in
        ascending rank order, f32 from +0.0, rounded once (also d x of dispatch backward when the
        incoming gradient is the received rows)."""
        x = self.inputs[rank][0]
        xf = x.astype(np.float32)
        acc = np.zeros(xf.shape, np.float32)
        for d in range(self.g):
            hit = self.hit[rank][:, d]
            acc[hit] += xf[hit]
        return acc.astype(self.dtype)

    def weights_grad(self, rank: int) -> np.ndarray:
        """d topk_weights of dispatch when the incoming weight gradient is the received weights."""
        _, idx, w = self.inputs[rank]
        return np.where(idx >= 0, w, np.float32(0)).astype(np.float32)

    # ---- HybridEP mode (pad_multiple None, exact size)
    def routing(self, rank: int):
        _, idx, w = self.inputs[rank]
        return to_routing_map(idx, w, self.e)

    def hybrid_dispatch(self, rank: int):
        """(hidden [P,H] expert-major, probs [P] f32, tokens_per_expert [L] int64)."""
        maps = [self.routing(s) for s in range(self.g)]
        rows, probs, per_expert = [], [], []
        for j in range(self.lpr):
            col = rank * self.lpr + j
            count = 0
            for s, (rm, p) in enumerate(maps):
                sel = rm[:, col]
                rows.append(self.inputs[s][0][sel])
                probs.append(p[sel, col])
                count += int(sel.sum())
            per_expert.append(count)
        return np.concatenate(rows), np.concatenate(probs), np.array(per_expert, np.int64)

    def hybrid_identity_combine(self, rank: int) -> np.ndarray:
        """combine_with_unpermute(dispatch_with_permute(x)): x summed over (rank ascending, local
        expert ascending) of every expert the token was routed to, f32, rounded once."""
        rm, _ = self.routing(rank)
        xf = self.inputs[rank][0].astype(np.float32)
        acc = np.zeros(xf.shape, np.float32)
        for col in range(self.e):
            hit = rm[:, col]
            acc[hit] += xf[hit]
        return acc.astype(self.dtype)

    def hybrid_probs_grad(self, rank: int) -> np.ndarray:
        """d probs [N,E] of dispatch when the incoming gradient is the dispatched probs."""
        return self.routing(rank)[1]

    # ---- all-to-all peers (rows only, splits known)
    def send_index(self, rank: int):
        """(token indices of `rank` in send order (destination-major, token ascending),
        rows sent to each destination [G])."""
        hit = self.hit[rank]
        order = [np.nonzero(hit[:, d])[0] for d in range(self.g)]
        return np.concatenate(order).astype(np.int64), self.counts[rank].copy()

    def send_rows(self, rank: int) -> np.ndarray:
        return self.inputs[rank][0][self.send_index(rank)[0]]
