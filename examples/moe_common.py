"""What the JAX and the PyTorch training examples share: the model, its initial weights, the data
(NumPy, from one seed), and the comparison / plot of the two loss curves. No framework imports.

The model: one pre-norm transformer block with a mixture-of-experts FFN, float32 throughout.

    h   = x + Attn(rms(x) * g1)                         causal, one head, per sequence
    u   = rms(h) * g2
    p   = softmax(u @ Wr)                               router over E = G * L experts
    idx = top-k of p; w = p[idx]                        (no renormalisation)
    moe = sum over the token's k experts e of w_e * (silu(u @ W1[e]) @ W2[e])
    y   = (h + moe) @ Wout
    loss = mean over every token of every rank and every feature of (y - target)^2

Expert parallelism: rank r holds experts [r*L, (r+1)*L) (W1, W2); everything else is replicated
and its gradient summed over ranks. The MoE term is computed with fused_a2a in one of two modes:
- normal (DeepEP-style): dispatch(u, idx, w) -> rows per rank; each row's output is
  sum_j gate_j * expert_j(row) with gate_j the received weight of local expert j; combine sums
  the ranks' rows back per token;
- hybrid (HybridEP): dispatch_with_permute(u, routing_map, probs) -> rows grouped by local expert,
  each row multiplied by its prob after its expert; combine_with_unpermute sums them per token.
Both compute the same function; the gradients reach the router through w / probs.

Data: every step a fresh batch x [G*B*T, D] ~ N(0, 1) (rank r gets rows [r*B*T, (r+1)*B*T)) and
target = 0.5 * tanh(x @ A) @ C with a fixed random teacher (A, C).
"""

from __future__ import annotations

import json
import os

import numpy as np

DEFAULTS = dict(d_model=32, d_ff=64, experts_per_rank=2, topk=2, batch=2, seq=16, lr=0.2, seed=0)


def config(ranks: int, **overrides) -> dict:
    cfg = dict(DEFAULTS, **{k: v for k, v in overrides.items() if v is not None})
    cfg["ranks"] = ranks
    cfg["experts"] = ranks * cfg["experts_per_rank"]
    cfg["tokens"] = cfg["batch"] * cfg["seq"]  # per rank
    return cfg


def init_params(cfg: dict) -> dict:
    """Initial weights (float32 NumPy); expert weights for all E experts."""
    rng = np.random.default_rng([cfg["seed"], 1])
    d, f, e = cfg["d_model"], cfg["d_ff"], cfg["experts"]

    def dense(*shape):
        return (rng.standard_normal(shape) / np.sqrt(shape[-2])).astype(np.float32)

    return {
        "wq": dense(d, d),
        "wk": dense(d, d),
        "wv": dense(d, d),
        "wo": dense(d, d),
        "g1": np.ones(d, np.float32),
        "g2": np.ones(d, np.float32),
        "wr": dense(d, e),
        "w1": dense(e, d, f),
        "w2": dense(e, f, d),
        "wout": dense(d, d),
    }


EXPERT_PARAMS = ("w1", "w2")


def batch(cfg: dict, step: int):
    """(x, target) for every rank, [G*B*T, D] float32 each."""
    teacher = np.random.default_rng([cfg["seed"], 2])
    d = cfg["d_model"]
    a = teacher.standard_normal((d, 2 * d)).astype(np.float32) / np.sqrt(d)
    c = teacher.standard_normal((2 * d, d)).astype(np.float32) / np.sqrt(2 * d)
    rng = np.random.default_rng([cfg["seed"], 3, step])
    x = rng.standard_normal((cfg["ranks"] * cfg["tokens"], d)).astype(np.float32)
    target = (0.5 * np.tanh(x @ a) @ c).astype(np.float32)
    return x, target


def save_curve(path: str, framework: str, mode: str, cfg: dict, losses, device: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(
            {
                "framework": framework,
                "mode": mode,
                "device": device,
                "config": cfg,
                "losses": [float(v) for v in losses],
            },
            f,
        )


def load_curve(path: str) -> dict:
    with open(path) as f:
        return json.load(f)


def compare(curves: list[dict], rtol: float = 1e-4) -> tuple[bool, list[str]]:
    """Every curve against the first, step by step: |a - b| <= rtol * |a| (fp32 tolerance for
    two frameworks' float32 arithmetic over the whole run)."""
    lines, ok = [], True
    ref = np.asarray(curves[0]["losses"])
    for c in curves[1:]:
        other = np.asarray(c["losses"])
        if other.shape != ref.shape:
            lines.append(f"{c['framework']} {c['mode']}: {other.size} steps vs {ref.size}")
            ok = False
            continue
        rel = np.abs(other - ref) / np.maximum(np.abs(ref), 1e-12)
        worst = int(rel.argmax())
        good = bool(rel.max() <= rtol)
        ok &= good
        lines.append(
            f"{c['framework']} {c['mode']} vs {curves[0]['framework']} {curves[0]['mode']}: max "
            f"relative difference {rel.max():.2e} at step {worst} "
            f"({'within' if good else 'OUTSIDE'} {rtol:g})"
        )
    return ok, lines


def plot(path: str, curves: list[dict], title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, ax_diff) = plt.subplots(1, 2, figsize=(11, 4.2))
    ref = np.asarray(curves[0]["losses"])
    styles = ["-", "--", ":", "-."]
    for i, c in enumerate(curves):
        losses = np.asarray(c["losses"])
        label = f"{c['framework']} ({c['mode']})"
        ax.plot(losses, styles[i % len(styles)], label=label, linewidth=1.5)
        if i and losses.shape == ref.shape:
            diff = np.abs(losses - ref) / np.maximum(np.abs(ref), 1e-12)
            steps = np.nonzero(diff)[0]  # equal steps (difference 0) are left out
            ax_diff.semilogy(
                steps,
                diff[steps],
                "o",
                markersize=2.5,
                label=f"{label} vs {curves[0]['framework']} ({curves[0]['mode']})",
            )
    ax.set_xlabel("step")
    ax.set_ylabel("loss (MSE)")
    ax.set_yscale("log")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    ax_diff.set_xlabel("step")
    ax_diff.set_ylabel("relative difference (0 not shown)")
    ax_diff.grid(True, alpha=0.3)
    ax_diff.legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def default_ranks() -> tuple[int, str]:
    """(ranks, device): all GPUs when a CUDA build of fused_a2a sees at least two, else 4 CPU
    ranks. Reads the core only (importing JAX here would fix its platform too early)."""
    try:
        import fused_a2a_core as core

        gpus = core.cuda_device_count() if core.build_info().get("cuda") else 0
    except Exception:  # noqa: BLE001 - no core, no GPUs
        gpus = 0
    return (gpus, "cuda") if gpus >= 2 else (4, "cpu")
