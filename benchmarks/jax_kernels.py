"""GPU kernels of the JAX normal dispatch's timing loop (the `fused-a2a bench` JAX loop), from
torch.profiler: CUPTI records every kernel of the process, XLA's included. Where the JAX
dispatch's time goes beyond the dispatch kernel: the kernels XLA runs between two dispatches,
and the gaps between kernels. Standard case (N = 4096, H = 7168, top-8 of 256 experts, bf16), one
process with every GPU (jax.shard_map over all of them).

    python benchmarks/jax_kernels.py [--world 4] [--iters 20] [--capacity worst|exact] --out F

FUSED_A2A_BENCH_JAX_TAIL=count keeps a [1] output of the dispatch instead of slicing recv_x
(fused_a2a/bench_jax.py, dispatch_tail).

Per device: the loop's period (dispatch kernel start to the next one's start), the dispatch
kernel's duration, the other kernels of one period (name, count, mean us) and the idle time
between kernels, each as a mean over the loop's iterations after the first.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")


def _program(world: int, n: int, capacity: str):
    """(prog, args): the bench's JAX dispatch loop, prog(count, *args)."""
    import jax_fused_a2a as fa
    from fused_a2a.bench_jax import Bench, _loop, dispatch_tail
    from fused_a2a.routing import Expected

    spec = dict(ranks=world, iters=1, reps=1)
    b = Bench(spec)
    exp = Expected.build(world, n, 7168, 8, 256, 0, "bf16")
    cap = world * n
    if capacity == "exact":
        cap = max(exp.recv_rows(r) for r in range(world))
    x = b.put([exp.inputs[r][0] for r in range(world)])
    idx = b.put([exp.inputs[r][1].astype("int32") for r in range(world)])
    w = b.put([exp.inputs[r][2] for r in range(world)])

    def t_dispatch(count, x, idx, w):
        disp = lambda w: dispatch_tail(  # noqa: E731
            fa.dispatch(x, idx, w, num_experts=256, axis_name="ep", max_recv_tokens=cap)
        )
        return _loop(count, disp, w)

    return b.smap(t_dispatch, 3, loop=True), (x, idx, w)


def _kernels(prog, args, iters: int):
    """[(device, start us, duration us, name)] of one run of prog(iters, *args), by start."""
    import jax
    from torch.profiler import ProfilerActivity, profile

    jax.block_until_ready(prog(iters, *args))  # compile and warm up
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        jax.block_until_ready(prog(iters, *args))
    rows = []
    for e in prof.events():
        if str(e.device_type).endswith("CUDA"):
            start, end = e.time_range.start, e.time_range.end
            rows.append((e.device_index, start, end - start, e.name))
    return sorted(rows, key=lambda r: (r[0], r[1]))


def _summary(rows: list, device: int) -> dict:
    """The loop's period, the dispatch kernel, the other kernels and the idle time (means over
    the iterations after the first) on one device."""
    mine = [r for r in rows if r[0] == device]
    starts = [i for i, r in enumerate(mine) if "dispatch_kernel" in r[3]]
    if len(starts) < 3:
        names = sorted({r[3][:60] for r in mine})
        return dict(error=f"{len(starts)} dispatch kernels found", kernel_names=names[:30])
    periods, main, idle, others = [], [], [], {}
    for a, b in zip(starts[1:-1], starts[2:], strict=True):
        periods.append(mine[b][1] - mine[a][1])
        main.append(mine[a][2])
        gap = 0.0
        for i in range(a, b):
            gap += max(0.0, mine[i + 1][1] - (mine[i][1] + mine[i][2]))
            if i > a:
                others.setdefault(mine[i][3][:80], []).append(mine[i][2])
        idle.append(gap)
    count = len(periods)
    return dict(
        iterations=count,
        period_us=round(statistics.mean(periods), 1),
        dispatch_kernel=mine[starts[1]][3][:100],
        dispatch_kernel_us=round(statistics.mean(main), 1),
        idle_us=round(statistics.mean(idle), 1),
        other_kernels={
            k: dict(per_iteration=round(len(v) / count, 2), mean_us=round(statistics.mean(v), 1))
            for k, v in others.items()
        },
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--world", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--capacity", choices=("worst", "exact"), default="worst")
    parser.add_argument("--out", default="")
    args = parser.parse_args()
    import jax

    prog, operands = _program(args.world, args.tokens, args.capacity)
    rows = _kernels(prog, operands, args.iters)
    devices = sorted({r[0] for r in rows})
    result = dict(
        world=args.world,
        tokens=args.tokens,
        capacity=args.capacity,
        tail=os.environ.get("FUSED_A2A_BENCH_JAX_TAIL", "recv_x"),
        sms=os.environ.get("FUSED_A2A_CUDA_BLOCKS", "default"),
        device=str(jax.devices()[0].device_kind),
        commit=os.environ.get("FA2A_COMMIT", "unknown"),
        per_device={str(d): _summary(rows, d) for d in devices},
    )
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    return 0 if rows else 1


if __name__ == "__main__":
    sys.exit(main())
