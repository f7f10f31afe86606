"""Checks, in XLA's optimized HLO dumps of the JAX bench's timing loops, that every loop body still
calls the timed op (a fused_a2a custom call, or the peer's all-to-all: not hoisted out of the
loop, not removed) and lists the copies in it.

    python tools/hlo_loop_check.py DUMP_DIR [--calls K]
      DUMP_DIR: the *after_optimizations.txt files of --xla_dump_to; --calls K: each loop must
      call the op exactly K times (FUSED_A2A_BENCH_JAX_UNROLL=K); default: at least once.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path


def computations(text: str) -> dict[str, str]:
    """name -> body text of each HLO computation."""
    out, name, lines = {}, None, []
    for line in text.splitlines():
        m = re.match(r"^(?:ENTRY )?%?([\w.\-]+) .*\{$", line)
        if m and not line.startswith(" "):
            name, lines = m.group(1), []
        elif line.startswith("}") and name:
            out[name] = "\n".join(lines)
            name = None
        elif name:
            lines.append(line)
    return out


def check(path: Path, want_calls: int | None) -> bool | None:
    """True / False: every loop body calls the timed op or not; None: no loop in this module."""
    text = path.read_text()
    comps = computations(text)
    bodies = set(re.findall(r"\bwhile\(.*?body=%?([\w.\-]+)", text))
    if not bodies:
        return None
    ok = True
    for body in sorted(bodies):
        code = comps.get(body, "")
        calls = len(re.findall(r"custom_call_target=\"fa2a_|\ball-to-all(?:-start)?\(", code))
        copies = re.findall(r"= (\S+) copy\(", code)
        print(f"{path.name}: loop {body}: {calls} timed op call(s), copies {copies or 'none'}")
        ok &= calls == want_calls if want_calls else calls > 0
    return ok


def main() -> int:
    import argparse

    parser = argparse.ArgumentParser()
    parser.add_argument("dump_dir")
    parser.add_argument("--calls", type=int, default=None)
    args = parser.parse_args()
    files = sorted(Path(args.dump_dir).glob("*after_optimizations.txt"))
    if not files:
        print(f"hlo_loop_check: no *after_optimizations.txt under {args.dump_dir}")
        return 1
    results = [r for r in (check(f, args.calls) for f in files) if r is not None]
    good = bool(results) and all(results)
    print("hlo_loop_check:", "ok" if good else "FAILED (no loop, or a loop without its op calls)")
    return 0 if good else 1


if __name__ == "__main__":
    sys.exit(main())
