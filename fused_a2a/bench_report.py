"""Rows, summary tables, JSON and the plot of ``fused-a2a bench``.

A row is one op of one implementation at one N. Metrics (BENCHMARKS.md):
- ``time_us``: median per call (GPU: CUDA events, torch; loop inside one jitted program, JAX),
  the slowest rank;
- ``gbps``: DeepEP's metric, bytes of recv_x on a rank (its own tokens included; the same logical
  rows for every implementation: one row per (token, destination rank)) / time, averaged over
  ranks; for combine the same bytes / combine time;
- ``wire_gbps``: the remote rows only (what crossed the link) / time;
- ``host_us``: host time per call, the slowest rank: torch, the call itself (enqueueing, and any
  host sync inside it); JAX, a one-iteration call of the jitted program minus one iteration;
- ``sms``: SMs the communication kernels use (GPU), None where unknown or on CPU;
- ``vs``: for each peer, peer time / this time for the op in the same direction (> 1: faster than
  the peer). Dispatch and combine backward move data like combine and dispatch respectively.
- ``dispatch_fp8`` (normal mode and HybridEP, bf16 runs): e4m3 rows with 1x128 f32 scales; bytes
  counted as moved.
"""

from __future__ import annotations

import json
import os

OPS = ("dispatch", "combine", "dispatch_bwd", "combine_bwd", "dispatch_fp8")
DIRECTION = {
    "dispatch": "dispatch",
    "combine_bwd": "dispatch",
    "combine": "combine",
    "dispatch_bwd": "combine",
    "dispatch_fp8": "dispatch",
}
# dispatch_fp8 (bf16 runs only): e4m3 rows + one f32 scale per 128 values, so its bytes
# are (1 + 4 / 128) / 2 of the bf16 rows'; its ratios compare times with the peers' bf16 dispatch.
BYTES_FACTOR = {"dispatch_fp8": (1 + 4 / 128) / 2}


_SHORT = {
    "all_to_all_single": "a2a",
    "ragged_all_to_all": "ragged a2a",
    "all_to_all (padded)": "padded a2a",
    "DeepEP": "DeepEP",
}


def impl_label(row: dict) -> str:
    if row["peer"]:
        return f"{row['frontend']} {row['impl']}"
    return f"{row['frontend']} {row['impl']} {row['mode']}"


def peer_short(row: dict) -> str:
    """Column name of a peer in the ratio columns."""
    if row["impl"] == "DeepEP":
        return "DeepEP"
    return f"{row['frontend']} {_SHORT.get(row['impl'], row['impl'])}"


def make_rows(frontend: str, unit_info: dict, merged: list[dict], ranks: int, device: str):
    """Rows from merged unit results; (rows, skipped entries, error entries)."""
    rows, skipped, errors = [], [], []
    for res in merged:
        impl, mode, peer = unit_info[res["unit"]]
        base = {
            "frontend": frontend,
            "impl": impl,
            "mode": mode,
            "peer": peer,
            "tokens": res["tokens"],
            "ranks": ranks,
            "device": device,
        }
        if "unsupported" in res or "error" in res:
            entry = {k: base[k] for k in ("frontend", "impl", "mode", "tokens")}
            if "unsupported" in res:
                entry["reason"] = res["unsupported"]
                skipped.append(entry)
            else:
                entry["error"] = res["error"]
                if res.get("traceback"):
                    entry["traceback"] = res["traceback"]
                errors.append(entry)
            continue
        ops = res["ops"]
        for op in OPS:
            if op not in ops:
                continue
            (us, host_us), ok = ops[op]
            us = float(us)
            recv_b, remote_b = (
                res[k] * BYTES_FACTOR.get(op, 1) for k in ("recv_bytes", "remote_bytes")
            )
            rows.append(
                {
                    **base,
                    "op": op,
                    "time_us": us,
                    "host_us": float(host_us),
                    "gbps": recv_b / us / 1e3 if us > 0 else None,
                    "wire_gbps": remote_b / us / 1e3 if us > 0 else None,
                    "recv_bytes": recv_b,
                    "remote_bytes": remote_b,
                    "sms": ops.get("sms"),
                    "arena": ops.get("arena"),
                    "verified": bool(ok),
                }
            )
    return rows, skipped, errors


def merge_ranks(per_rank: list[list[dict]]) -> list[dict]:
    """One result per unit from every rank's list (same order on every rank): the slowest rank's
    time, verified only if every rank verified, bytes averaged over ranks."""
    merged = []
    for entries in zip(*per_rank, strict=True):
        first = entries[0]
        res = {"unit": first["unit"], "tokens": first["tokens"]}
        bad = [e for e in entries if "error" in e or "unsupported" in e]
        if bad:
            if any("error" in e for e in bad):
                res["error"] = next(e["error"] for e in bad if "error" in e)
                res["traceback"] = next(
                    (e.get("traceback") for e in bad if e.get("traceback")), None
                )
            else:
                res["unsupported"] = bad[0]["unsupported"]
            merged.append(res)
            continue
        ops = {}
        for op in first["ops"]:
            if op == "sms":
                ops[op] = first["ops"][op]
                continue
            if op == "arena":  # torch's output-arena counts, summed over ranks
                ops[op] = {
                    k: sum(e["ops"].get(op, {}).get(k, 0) for e in entries)
                    for k in first["ops"][op]
                }
                continue
            timings = [e["ops"][op][0] for e in entries]  # (device_us, host_us) per rank
            ok = all(e["ops"][op][1] for e in entries)
            ops[op] = ((max(t[0] for t in timings), max(t[1] for t in timings)), ok)
        res["ops"] = ops
        for key in ("recv_bytes", "remote_bytes"):
            res[key] = sum(e[key] for e in entries) / len(entries)
        merged.append(res)
    return merged


def add_ratios(rows: list[dict]) -> None:
    peers = [r for r in rows if r["peer"]]
    for row in rows:
        row["vs"] = {}
        if row["peer"]:
            continue
        for p in peers:
            if p["tokens"] == row["tokens"] and p["op"] == DIRECTION[row["op"]] and p["time_us"]:
                row["vs"][peer_short(p)] = p["time_us"] / row["time_us"] if row["time_us"] else None


def _fmt(v, spec, empty="-"):
    return empty if v is None else format(v, spec)


def format_table(rows: list[dict], tokens: int) -> str:
    sel = [r for r in rows if r["tokens"] == tokens]
    peer_names = sorted({peer_short(r) for r in sel if r["peer"]})
    head = (
        f"{'implementation':34} {'op':12} {'time us':>9} {'host us':>8} {'GB/s':>8} "
        f"{'wire GB/s':>9} {'SMs':>4} "
        + " ".join(f"{'vs ' + p:>{max(14, len(p) + 3)}}" for p in peer_names)
        + "  verified"
    )
    lines = [head, "-" * len(head)]
    for r in sel:
        cells = []
        for p in peer_names:
            v = r["vs"].get(p)
            cells.append(f"{_fmt(v, '.2f') + ('x' if v else ''):>{max(14, len(p) + 3)}}")
        ratios = " ".join(cells)
        lines.append(
            f"{impl_label(r):34} {r['op']:12} {r['time_us']:>9.1f} "
            f"{_fmt(r.get('host_us'), '8.1f'):>8} {_fmt(r['gbps'], '8.2f'):>8} "
            f"{_fmt(r['wire_gbps'], '9.2f'):>9} {_fmt(r['sms'], 'd'):>4} {ratios}  "
            f"{'yes' if r['verified'] else 'NO'}"
        )
    return "\n".join(lines)


def format_sweep(rows: list[dict]) -> str:
    """DeepEP-style GB/s of dispatch / combine (forward) per implementation and N."""
    tokens = sorted({r["tokens"] for r in rows})
    impls = list(dict.fromkeys(impl_label(r) for r in rows))
    head = f"{'GB/s dispatch / combine':34} " + " ".join(f"{'N=' + str(n):>15}" for n in tokens)
    lines = [head, "-" * len(head)]
    for name in impls:
        cells = []
        for n in tokens:
            got = {r["op"]: r for r in rows if impl_label(r) == name and r["tokens"] == n}
            d, c = got.get("dispatch"), got.get("combine")
            cells.append(f"{_fmt(d and d['gbps'], '.1f')} / {_fmt(c and c['gbps'], '.1f')}")
        lines.append(f"{name:34} " + " ".join(f"{c:>15}" for c in cells))
    return "\n".join(lines)


def write_json(path: str, doc: dict) -> None:
    with open(path, "w") as f:
        json.dump(doc, f, indent=1)


def plot(path: str, rows: list[dict], title: str) -> None:
    """Bandwidth (DeepEP metric) vs tokens per rank, one line per implementation; dispatch and
    combine side by side (forward ops)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8), sharey=True)
    for ax, op in zip(axes, ("dispatch", "combine"), strict=True):
        for name in dict.fromkeys(impl_label(r) for r in rows):
            pts = sorted(
                (r["tokens"], r["gbps"])
                for r in rows
                if impl_label(r) == name and r["op"] == op and r["gbps"]
            )
            if pts:
                style = "--" if any(r["peer"] for r in rows if impl_label(r) == name) else "-"
                ax.plot(*zip(*pts, strict=True), style, marker="o", label=name)
        ax.set_xscale("log", base=2)
        ticks = sorted({r["tokens"] for r in rows})
        ax.set_xticks(ticks, [str(t) for t in ticks])
        ax.minorticks_off()
        ax.set_xlabel("tokens per rank (N)")
        ax.set_title(op)
        ax.grid(True, alpha=0.3)
    axes[0].set_ylabel("GB/s (bytes of recv_x incl. own tokens / time)")
    axes[1].legend(fontsize=8, loc="best")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def markdown(doc: dict, source: str = "") -> str:
    """A Markdown table of a bench JSON: ``fused-a2a bench``'s (the standard N's rows) or
    benchmarks/bench_normal.py's (one line per case and op)."""
    meta = doc.get("meta", {})
    card = meta.get("card") or meta.get("device") or "?"
    world = meta.get("config", {}).get("ranks") or meta.get("world") or "?"
    head = f"{card}, EP {world}, {meta.get('date', '?')}" + (
        f" ([{source}]({source}))" if source else ""
    )
    if "rows" in doc:
        cfg = meta.get("config", {})
        n = cfg.get("standard") or max(r["tokens"] for r in doc["rows"])
        sel = [r for r in doc["rows"] if r["tokens"] == n]
        peers = sorted({peer_short(r) for r in sel if r["peer"]})
        lines = [
            f"{head}: N={n}, H={cfg.get('hidden')}, top-{cfg.get('topk')} of "
            f"{cfg.get('experts')}, {cfg.get('dtype')}",
            "",
            "| implementation | op | time (us) | host (us) | GB/s | wire GB/s | SMs | "
            + "".join(f"vs {p} | " for p in peers)
            + "verified |",
            "| --- " * (8 + len(peers)) + "|",
        ]
        for r in sel:
            ratios = "".join(f"{_fmt(r['vs'].get(p), '.2f')} | " for p in peers)
            lines.append(
                f"| {impl_label(r)} | {r['op']} | {r['time_us']:.1f} "
                f"| {_fmt(r.get('host_us'), '.1f')} | {_fmt(r['gbps'], '.1f')} "
                f"| {_fmt(r['wire_gbps'], '.1f')} | {_fmt(r['sms'], 'd')} | {ratios}"
                f"{'yes' if r['verified'] else 'NO'} |"
            )
        for c in meta.get("link_ceiling", []):  # issue 7: this run's own ceiling
            got = f"{c['GBps']:.1f} GB/s per GPU" if "GBps" in c else "not measured"
            lines += ["", f"Link ceiling at {c['sms']} SMs ({c.get('method', '')}): {got}."]
        return "\n".join(lines)
    if "runs" in doc:  # benchmarks/results/*.json: runs of bench_normal.py with notes
        run = doc["runs"][-1]
        lines = [
            f"{doc.get('card', card)}; {doc.get('software', '')}; {doc.get('date', '')}"
            + (f" ([{source}]({source}))" if source else ""),
            f"run {run.get('run')} (commit {run.get('commit')}): {run.get('what', '')}",
        ]
        for key, part in run.items():
            if isinstance(part, dict) and "results" in part:
                cases = [c for c in part["results"] if c.get("case") in ("standard", "decode")]
                lines += ["", f"EP {part['meta'].get('world', key)}:", ""]
                lines += _case_table(cases or part["results"])
        return "\n".join(lines)
    return "\n".join([head, ""] + _case_table(doc.get("results", [])))


def _case_table(results: list[dict]) -> list[str]:
    """bench_normal.py results: one line per (case, op), with the ratio to NCCL's a2a."""
    lines = [
        "| case | op | time (us) | GB/s (DeepEP metric) | wire GB/s | SMs | vs NCCL a2a | exact |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in results:
        if "errors" in r:
            lines.append(f"| {r.get('case')} | error | {r['errors']} | | | | | |")
            continue
        nccl = r.get("nccl_a2a_us")
        for key in [k[: -len("_us")] for k in r if k.endswith("_us")]:
            ratio = "-" if key == "nccl_a2a" or not nccl else f"{nccl / r[key + '_us']:.2f}"
            sms = "-" if key == "nccl_a2a" else r.get("sms", "-")
            lines.append(
                f"| {r.get('case')} (N={r.get('n')}) | {key} | {r[key + '_us']:.1f} | "
                f"{_fmt(r.get(key + '_deepep_GBps'), '.1f')} | "
                f"{_fmt(r.get(key + '_wire_GBps'), '.1f')} | {sms} | {ratio} | "
                f"{'yes' if r.get('exact_all_ranks') else 'NO'} |"
            )
    return lines
