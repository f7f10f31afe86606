"""Train the same MoE block from the same initial weights on the same data in JAX and in PyTorch
(both modes), then check that the loss curves agree step by step and plot them together.

    python examples/train_both.py [--ranks G] [--steps 300] [--mode normal|hybrid|all]
                                  [--out examples_out] [--rtol 1e-4]

Writes DIR/{jax,torch}_{normal,hybrid}.json, DIR/losses.png and DIR/summary.json; exits 0 when
every curve agrees with the first one within rtol at every step and the loss went down.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import moe_common as mc  # noqa: E402
import moe_torch  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ranks", type=int, default=0)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--mode", choices=["normal", "hybrid", "all"], default="all")
    parser.add_argument("--device", choices=["auto", "cpu"], default="auto")
    parser.add_argument("--out", default="examples_out")
    parser.add_argument("--rtol", type=float, default=1e-4)
    args = parser.parse_args(argv)
    common = [
        "--steps",
        str(args.steps),
        "--mode",
        args.mode,
        "--device",
        args.device,
        "--out",
        args.out,
    ] + (["--ranks", str(args.ranks)] if args.ranks else [])
    modes = ("normal", "hybrid") if args.mode == "all" else (args.mode,)
    for mode in modes:  # no stale curves from an earlier run
        for fw in ("jax", "torch"):
            path = os.path.join(args.out, f"{fw}_{mode}.json")
            if os.path.exists(path):
                os.remove(path)
    t0 = time.perf_counter()
    jax_run = subprocess.run(
        [sys.executable, os.path.join(HERE, "moe_jax.py"), *common], timeout=3600
    )
    t_jax = time.perf_counter() - t0
    torch_rc = moe_torch.main(common)
    t_torch = time.perf_counter() - t0 - t_jax
    print(f"jax: {t_jax:.1f} s (rc {jax_run.returncode}), torch: {t_torch:.1f} s (rc {torch_rc})")

    curves, lines, ok = [], [], jax_run.returncode == 0 and torch_rc == 0
    for mode in modes:
        for fw in ("jax", "torch"):
            path = os.path.join(args.out, f"{fw}_{mode}.json")
            if os.path.exists(path):
                curves.append(mc.load_curve(path))
            else:
                lines.append(f"{fw} {mode}: no curve (unsupported here or failed)")
    if len(curves) < 2:
        lines.append("fewer than two curves: nothing to compare")
        ok = False
    else:
        agree, diffs = mc.compare(curves, args.rtol)
        ok &= agree
        lines += diffs
    for c in curves:
        first, last = c["losses"][0], c["losses"][-1]
        went_down = last < first
        ok &= went_down
        lines.append(
            f"{c['framework']} {c['mode']}: loss {first:.6f} -> {last:.6f} "
            f"({'decreased' if went_down else 'DID NOT DECREASE'})"
        )
    if curves:
        c0 = curves[0]
        title = (
            f"MoE block, EP {c0['config']['ranks']} on {c0['device']}: JAX vs PyTorch, "
            f"{len(c0['losses'])} SGD steps"
        )
        mc.plot(os.path.join(args.out, "losses.png"), curves, title)
        lines.append(f"wrote {os.path.join(args.out, 'losses.png')}")
    with open(os.path.join(args.out, "summary.json"), "w") as f:
        json.dump({"ok": bool(ok), "lines": lines, "rtol": args.rtol}, f, indent=1)
    print("\n".join(lines))
    print("OK: the curves agree" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
