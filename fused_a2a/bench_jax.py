"""The JAX side of ``fused-a2a bench`` / ``check``: every rank is a device of this one process
(CPU devices from XLA_FLAGS, or all GPUs). Run as a child process by the CLI:

    python -m fused_a2a.bench_jax '<json spec>'

Prints ``PROGRESS <text>`` lines while it works and one ``RESULT <json>`` line at the end.

Units: fused_a2a normal mode (jax_fused_a2a.dispatch / combine), fused_a2a HybridEP
(jax_fused_a2a.hybrid_dispatch / hybrid_combine, when the frontend has them), and the peer:
``jax.lax.ragged_all_to_all`` of the same rows on GPU, a capacity-padded ``jax.lax.all_to_all`` on
CPU (XLA:CPU does not implement ragged_all_to_all). Every output is checked bit for bit against
``fused_a2a.routing.Expected``.

Timing: each op runs 1 + R times in a loop inside one jitted shard_map (every call depends on the
previous one, so nothing is hoisted); the first call is untimed (the devices leave it together)
and the R timed calls sit between two device clock reads (jax_fused_a2a.read_clock: the GPU's
%globaltimer when the stream gets there, the host's steady clock on CPU). The time per op is
that interval / R on the slowest device, the median of `reps` calls. Up to session 17 it was
(T(1 + R) - T(1)) / R with T the median wall time of a call, whose host part (1 to 7 ms a call
on 4 GPUs, JAX_NOTES.md) moved the JAX figures by up to ~25 us an op between runs of the same
build (run 91: 554 and 578 us for a dispatch whose loop ran at 540 us a call in the profiler).
The wall times still give the host overhead: T(1) minus the device time of its two calls. Each
loop count is its own compiled program (Bench.smap), so XLA knows the trip count: with a runtime
count XLA:GPU synchronises the stream on the host to test the condition of every iteration.
FUSED_A2A_BENCH_JAX_UNROLL=k chains k calls per iteration (R x k calls, time divided by k), if
XLA keeps the k calls apart: it does not (on CPU and, in session 9's run 42, on GPU it drops them
once the optimization barriers that chain them are gone; tools/hlo_loop_check.py --calls k
checks).
"""

from __future__ import annotations

import json
import statistics
import sys
import time
import traceback

import numpy as np

from fused_a2a._common import kernel_sms
from fused_a2a.routing import DTYPES, Expected, fp8_rows, same_bits

UNITS = ("fused_normal", "fused_hybrid", "a2a")


def _out(obj) -> None:
    print(obj, flush=True)


class Bench:
    def __init__(self, spec: dict):
        import jax
        from jax.sharding import Mesh

        self.spec = spec
        self.g = spec["ranks"]
        devices = jax.devices()
        if len(devices) < self.g:
            raise RuntimeError(
                f"JAX sees {len(devices)} devices ({devices[0].platform}), the bench needs {self.g}"
            )
        self.platform = devices[0].platform
        self.mesh = Mesh(np.array(devices[: self.g]), ("ep",))

    # ---- helpers
    def put(self, per_rank: list):
        """Global array from per-rank NumPy arrays (sharded along axis 0 over the EP axis)."""
        import jax
        from jax.sharding import NamedSharding
        from jax.sharding import PartitionSpec as P

        return jax.device_put(np.concatenate(per_rank, axis=0), NamedSharding(self.mesh, P("ep")))

    def split(self, arr) -> list:
        a = np.asarray(arr)
        return np.split(a, self.g, axis=0)

    def smap(self, fn, n_args: int, loop: bool = False):
        """jit(shard_map(fn)) with every argument split over the EP axis. With `loop`, fn's first
        argument is the loop count, a Python int: prog(count, *args) compiles one program per
        count, so that XLA knows each loop's trip count. A while loop whose count is a runtime
        value makes XLA:GPU copy the condition to the host and synchronise the stream on every
        iteration (WhileThunk); a known trip count runs the body that many times without.
        FUSED_A2A_BENCH_JAX_COUNT=runtime passes the count as an operand instead (the A/B)."""
        import functools
        import os

        import jax
        import jax.numpy as jnp
        from jax.sharding import PartitionSpec as P

        specs = (P("ep"),) * n_args

        def compiled(f):
            return jax.jit(jax.shard_map(f, mesh=self.mesh, in_specs=specs, out_specs=P("ep")))

        if not loop:
            return compiled(fn)
        if os.environ.get("FUSED_A2A_BENCH_JAX_COUNT") == "runtime":  # the A/B: as up to session 9
            looped = jax.jit(
                jax.shard_map(fn, mesh=self.mesh, in_specs=(P(),) + specs, out_specs=P("ep"))
            )
            return lambda count, *args: looped(jnp.asarray(count, jnp.int32), *args)
        programs = {}

        def prog(count: int, *args):
            if count not in programs:
                programs[count] = compiled(functools.partial(fn, count))
            return programs[count](*args)

        prog.programs = programs  # count -> jitted program (tests read their HLO)
        return prog

    def time_loop(self, prog, args) -> tuple[float, float]:
        """(device_us, host_us): microseconds per call of the op looped by prog(R, *args) (a
        program whose last result is _loop's clocks), by the device clocks of the slowest device,
        and what a call of prog(1) costs beyond its 1 + k op calls (dispatching the jitted call,
        its launches and the wait for its result)."""
        import jax

        iters, reps = self.spec["iters"], self.spec["reps"]
        if iters <= 0:  # check: correctness only
            return 0.0, 0.0

        def measure(count):
            """Median wall seconds of prog(count) and median device seconds per timed call."""
            jax.block_until_ready(prog(count, *args))  # compile / warm up
            walls, per_call = [], []
            for _ in range(reps):
                t0 = time.perf_counter()
                out = jax.block_until_ready(prog(count, *args))
                walls.append(time.perf_counter() - t0)
                per_call.append(_slowest_interval_ns(out[-1], self.g) * 1e-9 / (count * k))
            return statistics.median(walls), statistics.median(per_call)

        k = _unroll()
        per_op = measure(iters)[1]
        short_wall = measure(1)[0]
        return per_op * 1e6, max(0.0, short_wall - (1 + k) * per_op) * 1e6


def _slowest_interval_ns(clocks, g: int) -> int:
    """The longest interval between _loop's two clock reads over the g devices: clocks holds each
    device's [t0 low, t0 high, t1 low, t1 high] uint32, devices one after another."""
    from jax_fused_a2a import clock_ns

    per_device = np.asarray(clocks, dtype=np.uint32).reshape(g, 2, 2)
    return max(clock_ns(d[1]) - clock_ns(d[0]) for d in per_device)


def _unroll() -> int:
    """Calls chained per loop iteration (FUSED_A2A_BENCH_JAX_UNROLL, default 1)."""
    import os

    return max(1, int(os.environ.get("FUSED_A2A_BENCH_JAX_UNROLL", "1")))


def _loop(count, op, carry):
    """(carry, first element of the last op(carry), clocks) after 1 + `count` x _unroll() calls
    of op(carry), each call waiting for the one before, at no cost to the timed loop. clocks [4]
    uint32: device clock reads (jax_fused_a2a.read_clock) after the first call and after the
    last, so they enclose the count x _unroll() timed calls.

    FUSED_A2A_BENCH_JAX_LOOP=dus chains the calls as session 6 did instead (the first element of
    the carry replaced by itself unless the op's first element is NaN), for an A/B."""
    import os

    import jax.numpy as jnp
    from jax import lax

    import jax_fused_a2a as fa

    dus = os.environ.get("FUSED_A2A_BENCH_JAX_LOOP") == "dus"

    def step(c):
        first = op(c).reshape(-1)[:1]
        # Varying over the mesh axis like the carry, whatever the op returns (a select that
        # XLA folds away).
        first = jnp.where(False, c.reshape(-1)[:1].astype(first.dtype), first)
        if dus:
            start = (0,) * c.ndim
            head = lax.dynamic_slice(c, start, (1,) * c.ndim)
            keep = jnp.where(jnp.isnan(first[0]), jnp.zeros_like(head), head)
            return lax.dynamic_update_slice(c, keep, start), first
        # An optimization barrier returns its operands unchanged (no copy) and hides that the
        # carry passes through, so the op stays in the loop; the first element rides along as
        # loop state so that the op is not dead code. The session-6 chaining (dus) cost a pass
        # over the carry each iteration on the GPU: the JAX combine and dispatch VJP (carries
        # ~235 MB at the standard case) ran 130-160 us slower than with the barrier (run 31).
        return lax.optimization_barrier((c, first))

    def body(_, state):
        c = state[0]
        for _ in range(_unroll()):
            c, first = step(c)
        return c, first

    # One untimed call first: the dispatch and combine wait for every peer, so the devices leave
    # it together, and the timed calls do not include the program's start skew between devices.
    c, first = step(carry)
    c, first, start = fa.read_clock(c, first)  # after the first call, before the loop
    c, first = lax.fori_loop(0, count, body, (c, first))
    first, end = fa.read_clock(first)
    return c, first, jnp.concatenate([start, end])


def _pad_rows(rows: np.ndarray, cap: int) -> np.ndarray:
    out = np.zeros((cap,) + rows.shape[1:], rows.dtype)
    out[: rows.shape[0]] = rows
    return out


def _check_padded(got: np.ndarray, want: np.ndarray) -> bool:
    """got = want followed by zero rows."""
    m = want.shape[0]
    tail = got[m:]
    return same_bits(got[:m], want) and not np.any(tail.astype(np.float32) != 0)


def _xw(d):
    return d.recv_x, d.recv_topk_weights


def _capacity(b: Bench, exp: Expected) -> int:
    """Rows of the normal dispatch's outputs: the op's default, the worst case G * N, or with
    FUSED_A2A_BENCH_JAX_CAPACITY=exact (a diagnostic: what the padding rows cost) the most rows
    any rank receives."""
    import os

    if os.environ.get("FUSED_A2A_BENCH_JAX_CAPACITY") == "exact":
        return max(exp.recv_rows(r) for r in range(b.g))
    return b.g * exp.n


def dispatch_tail(d):
    """The output of a dispatch that the timing loop keeps (_loop slices its first element):
    recv_x, or with FUSED_A2A_BENCH_JAX_TAIL=count (an A/B) the handle's num_kept, a [1] output
    of the same custom call, whose first element needs no slice kernel between two dispatches."""
    import os

    if os.environ.get("FUSED_A2A_BENCH_JAX_TAIL") == "count":
        return d.handle.num_kept
    return d.recv_x


def fused_normal(b: Bench, exp: Expected) -> dict:
    import jax

    import jax_fused_a2a as fa

    g, e, cap = b.g, exp.e, _capacity(b, exp)
    x = b.put([exp.inputs[r][0] for r in range(g)])
    idx = b.put([exp.inputs[r][1].astype(np.int32) for r in range(g)])
    w = b.put([exp.inputs[r][2] for r in range(g)])
    want = [exp.dispatch(r) for r in range(g)]
    gx = b.put([_pad_rows(wr[0], cap) for wr in want])
    gw = b.put([_pad_rows(wr[2], cap) for wr in want])

    def disp(x, idx, w):
        return fa.dispatch(x, idx, w, num_experts=e, axis_name="ep", max_recv_tokens=cap)

    def fwd(x, idx, w):
        d = disp(x, idx, w)
        out = fa.combine(d.recv_x, d.handle, axis_name="ep")
        return d.recv_x, d.recv_topk_idx, d.recv_topk_weights, d.tokens_per_expert, out

    def bwd(x, idx, w, gx, gw):
        _, vjp = jax.vjp(lambda x, w: _xw(disp(x, idx, w)), x, w)
        dx, dw = vjp((gx, gw))
        d = disp(x, idx, w)
        _, vjp_c = jax.vjp(lambda y: fa.combine(y, d.handle, axis_name="ep"), d.recv_x)
        return dx, dw, vjp_c(x)[0]

    rx, ridx, rw, tpe, out = b.smap(fwd, 3)(x, idx, w)
    dx, dw, dy = b.smap(bwd, 5)(x, idx, w, gx, gw)
    parts = {
        k: b.split(v)
        for k, v in dict(rx=rx, ridx=ridx, rw=rw, tpe=tpe, out=out, dx=dx, dw=dw, dy=dy).items()
    }
    ok_d = ok_c = ok_db = ok_cb = True
    for r in range(g):
        wx, widx, ww, wtpe = want[r]
        wcap = np.full((cap, widx.shape[1]), -1, np.int32)
        wcap[: widx.shape[0]] = widx
        ok_d &= (
            _check_padded(parts["rx"][r], wx)
            and np.array_equal(parts["ridx"][r], wcap)
            and _check_padded(parts["rw"][r], ww)
            and np.array_equal(parts["tpe"][r], wtpe)
        )
        ok_c &= same_bits(parts["out"][r], exp.identity_combine(r))
        ok_db &= same_bits(parts["dx"][r], exp.identity_combine(r)) and same_bits(
            parts["dw"][r], exp.weights_grad(r)
        )
        ok_cb &= _check_padded(parts["dy"][r], wx)

    def t_dispatch(n, x, idx, w):
        return _loop(n, lambda w: dispatch_tail(disp(x, idx, w)), w)

    def t_combine(n, x, idx, w):
        d = disp(x, idx, w)
        return _loop(n, lambda y: fa.combine(y, d.handle, axis_name="ep"), d.recv_x)

    def t_dispatch_bwd(n, x, idx, w, gx, gw):
        _, vjp = jax.vjp(lambda x, w: _xw(disp(x, idx, w)), x, w)
        return _loop(n, lambda c: vjp((c, gw))[0], gx)

    def t_combine_bwd(n, x, idx, w):
        d = disp(x, idx, w)
        _, vjp = jax.vjp(lambda y: fa.combine(y, d.handle, axis_name="ep"), d.recv_x)
        return _loop(n, lambda c: vjp(c)[0], x)

    ops = {
        "dispatch": (b.time_loop(b.smap(t_dispatch, 3, True), (x, idx, w)), ok_d),
        "combine": (b.time_loop(b.smap(t_combine, 3, True), (x, idx, w)), ok_c),
        "dispatch_bwd": (b.time_loop(b.smap(t_dispatch_bwd, 5, True), (x, idx, w, gx, gw)), ok_db),
        "combine_bwd": (b.time_loop(b.smap(t_combine_bwd, 3, True), (x, idx, w)), ok_cb),
        "sms": kernel_sms(0) if b.platform == "gpu" else None,
    }
    h = exp.inputs[0][0].shape[1]
    if np.dtype(exp.inputs[0][0].dtype) == DTYPES["bf16"] and h % 128 == 0:
        ops["dispatch_fp8"] = _normal_fp8(b, exp, idx, w, h)
    return ops


def _normal_fp8(b: Bench, exp: Expected, idx, w, h: int):
    """Normal-mode dispatch of e4m3 rows with their 1x128 f32 scales (x_scales=), checked as data
    movement: the e4m3 bytes land where a bf16 dispatch puts the same bytes as integers 0..126,
    the scales where an f32 dispatch puts them (rows padded to 16 bytes)."""
    import jax
    import jax.numpy as jnp
    import ml_dtypes

    import jax_fused_a2a as fa

    g, e, nsc = b.g, exp.e, h // 128
    bits, scales, padded = zip(*(fp8_rows(exp.n, h, 4321 + r) for r in range(g)), strict=True)
    x8 = b.put([a.view(ml_dtypes.float8_e4m3fn) for a in bits])
    carried = b.put([a.astype(np.float32).astype(DTYPES["bf16"]) for a in bits])
    s8, sp = b.put(list(scales)), b.put(list(padded))
    kw = dict(num_experts=e, axis_name="ep")

    def check(x8, carried, s8, sp, idx, w):
        d8 = fa.dispatch(x8, idx, w, x_scales=s8, **kw)
        rows = jax.lax.bitcast_convert_type(d8.recv_x, jnp.uint8)
        want_rows = fa.dispatch(carried, idx, w, **kw).recv_x.astype(jnp.uint8)
        want_scales = fa.dispatch(sp, idx, w, **kw).recv_x[:, :nsc]
        ok = jnp.all(rows == want_rows) & jnp.all(d8.recv_x_scales == want_scales)
        return ok[None]

    ok = bool(np.all(np.asarray(b.smap(check, 6)(x8, carried, s8, sp, idx, w))))

    def t_dispatch(n, x8, s8, idx, w):
        return _loop(n, lambda w: fa.dispatch(x8, idx, w, x_scales=s8, **kw).recv_x, w)

    return b.time_loop(b.smap(t_dispatch, 4, True), (x8, s8, idx, w)), ok


def fused_hybrid(b: Bench, exp: Expected) -> dict:
    import jax

    import jax_fused_a2a as fa

    if not hasattr(fa, "hybrid_dispatch"):
        raise NotImplementedError("jax_fused_a2a has no hybrid_dispatch yet")
    g, lpr = b.g, exp.lpr
    want = [exp.hybrid_dispatch(r) for r in range(g)]
    cap = max(1, max(wr[0].shape[0] for wr in want))  # static P: the largest exact size
    x = b.put([exp.inputs[r][0] for r in range(g)])
    rm = b.put([exp.routing(r)[0] for r in range(g)])
    probs = b.put([exp.routing(r)[1] for r in range(g)])
    gh = b.put([_pad_rows(wr[0], cap) for wr in want])
    gp = b.put([_pad_rows(wr[1], cap) for wr in want])

    def disp(x, rm, p):
        return fa.hybrid_dispatch(
            x, rm, p, num_local_experts=lpr, num_permuted_tokens=cap, axis_name="ep"
        )

    def comb(y, handle):
        return fa.hybrid_combine(y, handle, axis_name="ep")

    def fwd(x, rm, p):
        d = disp(x, rm, p)
        return d.hidden, d.probs, d.tokens_per_expert, comb(d.hidden, d.handle)

    def bwd(x, rm, p, gh, gp):
        _, vjp = jax.vjp(lambda x, p: tuple(disp(x, rm, p)[:2]), x, p)
        dx, dp = vjp((gh, gp))
        d = disp(x, rm, p)
        _, vjp_c = jax.vjp(lambda y: comb(y, d.handle), d.hidden)
        return dx, dp, vjp_c(x)[0]

    hid, hp, tpe, out = b.smap(fwd, 3)(x, rm, probs)
    dx, dp, dy = b.smap(bwd, 5)(x, rm, probs, gh, gp)
    parts = {
        k: b.split(v)
        for k, v in dict(hid=hid, hp=hp, tpe=tpe, out=out, dx=dx, dp=dp, dy=dy).items()
    }
    ok_d = ok_c = ok_db = ok_cb = True
    for r in range(g):
        wh, wp, wtpe = want[r]
        ok_d &= (
            _check_padded(parts["hid"][r], wh)
            and _check_padded(parts["hp"][r], wp)
            and np.array_equal(parts["tpe"][r].astype(np.int64), wtpe)
        )
        ok_c &= same_bits(parts["out"][r], exp.hybrid_identity_combine(r))
        ok_db &= same_bits(parts["dx"][r], exp.hybrid_identity_combine(r)) and same_bits(
            parts["dp"][r], exp.hybrid_probs_grad(r)
        )
        ok_cb &= _check_padded(parts["dy"][r], wh)

    def t_dispatch(n, x, rm, p):
        return _loop(n, lambda p: disp(x, rm, p).hidden, p)

    def t_combine(n, x, rm, p):
        d = disp(x, rm, p)
        return _loop(n, lambda y: comb(y, d.handle), d.hidden)

    def t_dispatch_bwd(n, x, rm, p, gh, gp):
        _, vjp = jax.vjp(lambda x, p: tuple(disp(x, rm, p)[:2]), x, p)
        return _loop(n, lambda c: vjp((c, gp))[0], gh)

    def t_combine_bwd(n, x, rm, p):
        d = disp(x, rm, p)
        _, vjp = jax.vjp(lambda y: comb(y, d.handle), d.hidden)
        return _loop(n, lambda c: vjp(c)[0], x)

    return {
        "dispatch": (b.time_loop(b.smap(t_dispatch, 3, True), (x, rm, probs)), ok_d),
        "combine": (b.time_loop(b.smap(t_combine, 3, True), (x, rm, probs)), ok_c),
        "dispatch_bwd": (
            b.time_loop(b.smap(t_dispatch_bwd, 5, True), (x, rm, probs, gh, gp)),
            ok_db,
        ),
        "combine_bwd": (b.time_loop(b.smap(t_combine_bwd, 3, True), (x, rm, probs)), ok_cb),
        "sms": kernel_sms(0) if b.platform == "gpu" else None,
    }


def a2a(b: Bench, exp: Expected) -> dict:
    """The peer: the same rows with lax.ragged_all_to_all (GPU) or a capacity-padded
    lax.all_to_all (CPU); rows pre-gathered (no count exchange, no permute), and the reverse."""
    import jax
    import jax.numpy as jnp

    g, c = b.g, exp.counts  # c[src, dst] rows
    sends = [exp.send_rows(r) for r in range(g)]
    wants = [exp.dispatch(r)[0] for r in range(g)]
    if b.platform != "cpu":
        return _ragged(b, exp, sends, wants)
    cap = max(1, int(c.max()))  # rows per (src, dst) block
    blocks = []
    for r in range(g):
        idx, _ = exp.send_index(r)
        padded = np.full((g, cap), exp.n, np.int32)  # index N: a zero row
        start = 0
        for d in range(g):
            padded[d, : c[r, d]] = idx[start : start + c[r, d]]
            start += c[r, d]
        blocks.append(padded.reshape(-1))
    x = b.put([exp.inputs[r][0] for r in range(g)])
    send_idx = b.put(blocks)

    def gather(x, send_idx):
        return jnp.take(x, send_idx, axis=0, mode="fill", fill_value=0)

    def exchange(s):
        return jax.lax.all_to_all(s, "ep", 0, 0, tiled=True)

    def fwd(x, send_idx):
        s = gather(x, send_idx)
        out = exchange(s)
        return out, exchange(out)

    out, back = b.smap(fwd, 2)(x, send_idx)
    outs, backs = b.split(out), b.split(back)
    ok_f = ok_r = True
    for r in range(g):
        got = np.concatenate([outs[r][s * cap : s * cap + c[s, r]] for s in range(g)])
        ok_f &= same_bits(got, wants[r])
        got_back = np.concatenate([backs[r][d * cap : d * cap + c[r, d]] for d in range(g)])
        ok_r &= same_bits(got_back, sends[r])

    def t_fwd(n, x, send_idx):
        return _loop(n, lambda s: exchange(s), gather(x, send_idx))

    def t_rev(n, x, send_idx):
        return _loop(n, lambda s: exchange(s), exchange(gather(x, send_idx)))

    prog_f, prog_r = b.smap(t_fwd, 2, True), b.smap(t_rev, 2, True)
    return {
        "dispatch": (b.time_loop(prog_f, (x, send_idx)), ok_f),
        "combine": (b.time_loop(prog_r, (x, send_idx)), ok_r),
        "sms": None,
    }


def _ragged(b: Bench, exp: Expected, sends: list, wants: list) -> dict:
    import jax

    g, c = b.g, exp.counts
    s_max = max(1, max(s.shape[0] for s in sends))
    m_max = max(1, max(w.shape[0] for w in wants))
    i32 = np.int32
    # forward: rank r sends its block for d to d, where it lands after the blocks of ranks < r
    in_off = [np.concatenate([[0], np.cumsum(c[r])[:-1]]).astype(i32) for r in range(g)]
    out_off = [np.array([c[:r, d].sum() for d in range(g)], i32) for r in range(g)]
    recv_off = [np.concatenate([[0], np.cumsum(c[:, r])[:-1]]).astype(i32) for r in range(g)]
    send_sz = [c[r].astype(i32) for r in range(g)]
    recv_sz = [c[:, r].astype(i32) for r in range(g)]
    # reverse: rank r returns the block from s (at recv_off) to s's send offset for r
    back_off = [np.array([in_off[s][r] for s in range(g)], i32) for r in range(g)]
    ops = [b.put([_pad_rows(s, s_max) for s in sends])]
    ops += [b.put(v) for v in (in_off, send_sz, out_off, recv_sz, recv_off, back_off)]

    def fwd_x(s, io, ss, oo, rs):
        return jax.lax.ragged_all_to_all(s, _zeros(m_max, s), io, ss, oo, rs, axis_name="ep")

    def rev_x(o, ro, rs, bo, ss):
        return jax.lax.ragged_all_to_all(o, _zeros(s_max, o), ro, rs, bo, ss, axis_name="ep")

    def both(s, io, ss, oo, rs, ro, bo):
        out = fwd_x(s, io, ss, oo, rs)
        return out, rev_x(out, ro, rs, bo, ss)

    out, back = b.smap(both, 7)(*ops)
    outs, backs = b.split(out), b.split(back)
    ok_f = all(same_bits(outs[r][: wants[r].shape[0]], wants[r]) for r in range(g))
    ok_r = all(same_bits(backs[r][: sends[r].shape[0]], sends[r]) for r in range(g))

    def t_fwd(n, s, io, ss, oo, rs, ro, bo):
        return _loop(n, lambda s: fwd_x(s, io, ss, oo, rs), s)

    def t_rev(n, s, io, ss, oo, rs, ro, bo):
        out = fwd_x(s, io, ss, oo, rs)
        return _loop(n, lambda o: rev_x(o, ro, rs, bo, ss), out)

    return {
        "dispatch": (b.time_loop(b.smap(t_fwd, 7, True), ops), ok_f),
        "combine": (b.time_loop(b.smap(t_rev, 7, True), ops), ok_r),
        "sms": None,
    }


def _zeros(rows, like):
    import jax.numpy as jnp

    return jnp.zeros((rows,) + like.shape[1:], like.dtype)


def _reset() -> None:
    try:
        import jax_fused_a2a as fa

        fa.reset()
    except Exception:  # noqa: BLE001 - best effort
        pass


_UNIT_FNS = {"fused_normal": fused_normal, "fused_hybrid": fused_hybrid, "a2a": a2a}


def peer_name(platform: str) -> str:
    return "all_to_all (padded)" if platform == "cpu" else "ragged_all_to_all"


def run(spec: dict) -> dict:
    b = Bench(spec)
    results, skipped = [], {}
    names = {
        "fused_normal": "fused_a2a normal",
        "fused_hybrid": "fused_a2a hybrid",
        "a2a": peer_name(b.platform),
    }
    for n in spec["tokens"]:
        exp = Expected.build(
            b.g, n, spec["hidden"], spec["topk"], spec["experts"], spec["seed"], spec["dtype"]
        )
        for unit in spec["units"]:
            label = f"jax {names[unit]} N={n}"
            res: dict = {"unit": unit, "tokens": n}
            if unit in skipped:
                _out(f"PROGRESS {label} (skipped)")
                continue
            try:
                res["ops"] = _UNIT_FNS[unit](b, exp)
                res["recv_bytes"] = float(
                    np.mean([exp.recv_rows(r) for r in range(b.g)]) * exp.row_bytes()
                )
                res["remote_bytes"] = float(
                    np.mean([exp.recv_rows(r) - exp.own_rows(r) for r in range(b.g)])
                    * exp.row_bytes()
                )
            except NotImplementedError as err:
                res["unsupported"] = skipped[unit] = f"{type(err).__name__}: {err}"[:2000]
            except Exception as err:  # noqa: BLE001 - reported in the table
                text = f"{type(err).__name__}: {err}"[:2000]
                if "UNIMPLEMENTED" in text:
                    res["unsupported"] = text
                else:
                    res["error"] = text
                    res["traceback"] = traceback.format_exc()[-4000:]
                skipped[unit] = text
            if "ops" not in res:
                _reset()  # a failed op may leave its buffers unusable; start the next one fresh
            results.append(res)
            _out(f"PROGRESS {label}")
    return {
        "platform": b.platform,
        "devices": [str(d) for d in b.mesh.devices.flat],
        "peer": peer_name(b.platform),
        "results": results,
    }


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    spec = json.loads(argv[0])
    assert spec["dtype"] in DTYPES
    try:
        out = run(spec)
    except Exception as err:  # noqa: BLE001 - the parent prints it
        out = {"fatal": f"{type(err).__name__}: {err}\n{traceback.format_exc()[-4000:]}"}
    _out("RESULT " + json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
