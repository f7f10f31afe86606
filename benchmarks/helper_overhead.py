"""Host cost of the torch Megatron helpers' autograd Functions, in one CPU process (a one-rank gloo
group: no peer to wait for, so the figures hold still on a small machine).

    python benchmarks/helper_overhead.py [--reps 11] [--calls 2000]

Times fused_dispatch and fused_combine without gradients two ways, alternating: as the helpers
run them (their forwards alone, _ops.apply) and forced through Function.apply; prints the medians
of the repetitions (us a call) and each repetition's dispatch time.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
import torch.distributed as dist


def _time(fn, calls: int, warmup: int = 500) -> float:
    for _ in range(warmup):
        fn()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=11)
    parser.add_argument("--calls", type=int, default=2000)
    args = parser.parse_args()
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29531")
    dist.init_process_group("gloo", rank=0, world_size=1)
    import torch_fused_a2a as tfa
    from torch_fused_a2a import _ops

    group, (n, h, k, e) = dist.group.WORLD, (16, 128, 2, 8)
    torch.manual_seed(0)
    x = torch.randn(n, h).bfloat16()
    idx = torch.topk(torch.rand(n, e), k, 1).indices
    w = torch.rand(n, k)
    recv_x, _, _, _, handle = tfa.fused_dispatch(x, idx, w, e, group)

    def forced(function, grad_inputs, *fn_args):
        return function.apply(*fn_args)

    routes = {"forward alone": _ops.apply, "Function.apply": forced}
    times = {name: ([], []) for name in routes}
    try:
        for _ in range(args.reps):
            for name, route in routes.items():
                _ops.apply = route
                dispatch = _time(lambda: tfa.fused_dispatch(x, idx, w, e, group), args.calls)
                combine = _time(lambda: tfa.fused_combine(recv_x, group, handle), args.calls)
                times[name][0].append(dispatch)
                times[name][1].append(combine)
    finally:
        _ops.apply = routes["forward alone"]
        dist.destroy_process_group()
    for name, (disp, comb) in times.items():
        print(
            f"{name:15s} fused_dispatch {statistics.median(disp):6.1f} us  fused_combine "
            f"{statistics.median(comb):6.1f} us  (dispatch runs {[round(v, 1) for v in disp]})"
        )


if __name__ == "__main__":
    main()
