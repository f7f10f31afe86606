"""Train the MoE block of moe_common.py with expert parallelism in PyTorch: one process per rank
(torch.distributed: gloo on CPU, NCCL on GPUs), no DDP. Each rank holds its experts' weights and a
replica of the rest; torch_fused_a2a moves the tokens (fused_dispatch / fused_combine in normal
mode, hybrid_ep_dispatch / hybrid_ep_combine in HybridEP mode); the replicated weights' gradients
are summed with one all_reduce; plain SGD.

    python examples/moe_torch.py [--ranks G] [--steps 300] [--mode normal|hybrid|all] [--out DIR]

Runs on CPU ranks by default and on all GPUs when a CUDA build of fused_a2a sees at least two.
Writes DIR/torch_<mode>.json with the loss of every step.
"""

from __future__ import annotations

import argparse
import math
import multiprocessing
import os
import queue as queue_module
import socket
import sys
import time
import traceback

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import moe_common as mc  # noqa: E402


class Block:
    """The model of moe_common.py on one rank."""

    def __init__(self, cfg: dict, rank: int, device, group):
        import torch

        self.cfg, self.rank, self.group = cfg, rank, group
        el = cfg["experts_per_rank"]
        params = mc.init_params(cfg)
        for name in mc.EXPERT_PARAMS:  # this rank's experts only
            params[name] = params[name][rank * el : (rank + 1) * el]
        self.params = {
            k: torch.tensor(v, device=device, requires_grad=True) for k, v in params.items()
        }
        self.replicated = [k for k in self.params if k not in mc.EXPERT_PARAMS]

    @staticmethod
    def rms(x, gain):
        import torch

        return x * torch.rsqrt((x * x).mean(-1, keepdim=True) + 1e-6) * gain

    def attention(self, x):
        import torch

        p, c = self.params, self.cfg
        b, t, d = c["batch"], c["seq"], c["d_model"]
        q, k, v = ((x @ p[n]).reshape(b, t, d) for n in ("wq", "wk", "wv"))
        scores = q @ k.transpose(1, 2) / math.sqrt(d)
        causal = torch.ones(t, t, dtype=torch.bool, device=x.device).tril()
        scores = torch.where(causal, scores, torch.tensor(-1e30, device=x.device))
        return (torch.softmax(scores, -1) @ v).reshape(b * t, d) @ p["wo"]

    def expert(self, u, j):
        import torch

        return torch.nn.functional.silu(u @ self.params["w1"][j]) @ self.params["w2"][j]

    def moe(self, u, probs, mode):
        import torch

        import torch_fused_a2a as tfa

        c = self.cfg
        weights, idx = torch.topk(probs, c["topk"], dim=-1)
        if mode == "normal":
            recv_x, recv_idx, recv_w, _, handle = tfa.fused_dispatch(
                u, idx, weights, c["experts"], self.group
            )
            y = torch.zeros_like(recv_x)
            for j in range(c["experts_per_rank"]):
                gate = torch.where(recv_idx == j, recv_w, 0.0).sum(-1, keepdim=True)
                y = y + gate * self.expert(recv_x, j)
            return tfa.fused_combine(y, self.group, handle)[0]
        routing_map = torch.zeros_like(probs, dtype=torch.bool).scatter_(1, idx, True)
        dense_probs = torch.where(routing_map, probs, 0.0)
        hidden, row_probs, _, per_expert, handle = tfa.hybrid_ep_dispatch(
            u, routing_map, dense_probs, self.group, c["experts_per_rank"]
        )
        rows = torch.split(hidden, per_expert.tolist())
        probs_rows = torch.split(row_probs, per_expert.tolist())
        y = torch.cat(
            [
                p[:, None] * self.expert(r, j)
                for j, (r, p) in enumerate(zip(rows, probs_rows, strict=True))
            ]
        )
        return tfa.hybrid_ep_combine(y, handle)

    def loss(self, x, target, mode):
        import torch

        p, c = self.params, self.cfg
        h = x + self.attention(self.rms(x, p["g1"]))
        u = self.rms(h, p["g2"])
        probs = torch.softmax(u @ p["wr"], -1)
        y = (h + self.moe(u, probs, mode)) @ p["wout"]
        return ((y - target) ** 2).sum() / (c["ranks"] * c["tokens"] * c["d_model"])

    def sgd_step(self, x, target, mode) -> float:
        import torch
        import torch.distributed as dist

        loss = self.loss(x, target, mode)
        loss.backward()
        grads = [self.params[k].grad for k in self.replicated]
        flat = torch.cat([g.reshape(-1) for g in grads] + [loss.detach().reshape(1)])
        dist.all_reduce(flat, group=self.group)  # replicated grads and the loss, summed
        offset = 0
        with torch.no_grad():
            for k in self.replicated:
                p = self.params[k]
                p -= self.cfg["lr"] * flat[offset : offset + p.numel()].view_as(p)
                offset += p.numel()
            for k in mc.EXPERT_PARAMS:
                self.params[k] -= self.cfg["lr"] * self.params[k].grad
            for p in self.params.values():
                p.grad = None
        return float(flat[-1])


def rank_main(rank, world, port, cfg, modes, steps, device_kind, results) -> None:
    try:
        import torch
        import torch.distributed as dist

        if device_kind == "cuda":
            torch.cuda.set_device(rank)
            torch.backends.cuda.matmul.allow_tf32 = False  # fp32 parity with JAX
            device = torch.device("cuda", rank)
        else:
            torch.set_num_threads(1)
            device = torch.device("cpu")
        dist.init_process_group(
            "nccl" if device_kind == "cuda" else "gloo",
            init_method=f"tcp://127.0.0.1:{port}",
            rank=rank,
            world_size=world,
        )
        n = cfg["tokens"]
        for mode in modes:
            model = Block(cfg, rank, device, dist.group.WORLD)
            losses, t0 = [], time.perf_counter()
            try:
                for i in range(steps):
                    x, target = mc.batch(cfg, i)
                    x, target = (
                        torch.tensor(a[rank * n : (rank + 1) * n], device=device)
                        for a in (x, target)
                    )
                    losses.append(model.sgd_step(x, target, mode))
                    if rank == 0 and (i % 50 == 0 or i == steps - 1):
                        print(
                            f"torch {mode} step {i:4d} loss {losses[-1]:.6f} "
                            f"({time.perf_counter() - t0:.1f} s)",
                            flush=True,
                        )
            except NotImplementedError as err:  # e.g. HybridEP not on this backend yet
                results.put((rank, mode, f"unsupported: {err}"))
                continue
            results.put((rank, mode, losses))
        dist.barrier()
        dist.destroy_process_group()
    except BaseException as err:  # noqa: BLE001 - reported by the parent
        results.put((rank, "fatal", f"{type(err).__name__}: {err}\n{traceback.format_exc()}"))


def train(cfg: dict, modes, steps: int, device: str, timeout: float = 1800) -> dict:
    """{mode: losses or 'unsupported: ...'} from `cfg['ranks']` rank processes."""
    ctx = multiprocessing.get_context("spawn")
    results = ctx.Queue()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    world = cfg["ranks"]
    procs = [
        ctx.Process(
            target=rank_main, args=(r, world, port, cfg, list(modes), steps, device, results)
        )
        for r in range(world)
    ]
    for p in procs:
        p.start()
    got, deadline = {}, time.monotonic() + timeout
    try:
        while len(got) < world * len(modes):
            try:
                rank, mode, value = results.get(timeout=1.0)
            except queue_module.Empty:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"torch training did not finish in {timeout} s") from None
                if any(p.exitcode not in (None, 0) for p in procs) and results.empty():
                    raise RuntimeError("a torch rank process died") from None
                continue
            if mode == "fatal":
                raise RuntimeError(f"torch rank {rank} failed: {value}")
            got[(rank, mode)] = value
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    return {mode: got[(0, mode)] for mode in modes}


def parse(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ranks", type=int, default=0, help="EP size (default: all GPUs, or 4)")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--mode", choices=["normal", "hybrid", "all"], default="all")
    parser.add_argument("--device", choices=["auto", "cpu"], default="auto")
    parser.add_argument("--lr", type=float, default=None)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--out", default="examples_out")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse(argv)
    ranks, device = mc.default_ranks()
    if args.device == "cpu":
        ranks, device = 4, "cpu"
    cfg = mc.config(args.ranks or ranks, lr=args.lr, seed=args.seed)
    modes = ("normal", "hybrid") if args.mode == "all" else (args.mode,)
    for mode, losses in train(cfg, modes, args.steps, device).items():
        if isinstance(losses, str):
            print(f"torch {mode}: {losses.splitlines()[0][:300]}")
            continue
        path = os.path.join(args.out, f"torch_{mode}.json")
        mc.save_curve(path, "torch", mode, cfg, losses, device)
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
