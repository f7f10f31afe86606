"""Multi-process harness: run a function on `world_size` real torch.distributed ranks (gloo, CPU).

    results = run_ranks(fn, world_size, *args, timeout=120, env=None, expect_errors=False)

Each rank is a fresh process (multiprocessing "spawn" context) that
  1. applies `env` (plus OMP_NUM_THREADS=1 unless given) to os.environ, before torch is imported,
  2. initialises torch.distributed with the gloo backend
     (init_method tcp://127.0.0.1:<free port>, the same `timeout` for gloo's own waits),
  3. calls `fn(rank, world_size, *args)` and sends back its return value (must be picklable:
     plain Python, numpy arrays, ...) or, if it raised, a `RankError` with the traceback text.

`fn` must be a module-level function (it is pickled by reference). Every wait is bounded by
`timeout` seconds in all: a rank that has not reported by then (hung, deadlocked) makes the harness
kill every process and raise an AssertionError that names the ranks that did not finish. A rank
that raises, or dies without reporting (os._exit, a crash), is an AssertionError too, unless
`expect_errors=True`, in which case its slot in the returned list holds a `RankError` instead of
a value. Processes are always cleaned up (terminated, then killed) before run_ranks returns.

Only the standard library is imported at module level, so importing this file is cheap and the
child applies `env` before anything imports torch.
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.connection
import os
import pickle
import socket
import sys
import time
import traceback

__all__ = ["RankError", "run_ranks", "run_once", "free_port"]

# After one rank fails (and errors are not expected), how long the others may still report before
# they are killed: they are usually stuck in a collective waiting for the failed rank.
_GRACE_AFTER_ERROR_S = 5.0


class RankError(Exception):
    """What a rank raised (or how it died), as text: exception objects need not be picklable."""

    def __init__(self, rank: int, type_name: str, message: str, traceback_text: str = ""):
        super().__init__(rank, type_name, message, traceback_text)
        self.rank = rank
        self.type_name = type_name
        self.message = message
        self.traceback = traceback_text

    def __str__(self) -> str:
        return f"rank {self.rank} raised {self.type_name}: {self.message}"

    def full(self) -> str:
        """The one-line summary followed by the rank's traceback."""
        return f"{self}\n{self.traceback}" if self.traceback else str(self)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _send(conn, rank: int, kind: str, payload) -> None:
    try:
        data = pickle.dumps((kind, payload))
    except Exception as exc:  # an unpicklable return value is reported, not lost
        data = pickle.dumps(
            ("error", (type(exc).__name__, f"result not picklable: {exc}", traceback.format_exc()))
        )
    conn.send_bytes(data)


def _worker(rank, world_size, port, payload, env, timeout, conn) -> None:
    os.environ.update(env)
    status = 0
    try:
        fn, args = pickle.loads(payload)
        import datetime

        import torch.distributed as dist

        dist.init_process_group(
            "gloo",
            init_method=f"tcp://127.0.0.1:{port}",
            rank=rank,
            world_size=world_size,
            timeout=datetime.timedelta(seconds=timeout),
        )
        dist.barrier()  # every rank is connected before fn runs (a rank that exits at once is fine)
        try:
            result = fn(rank, world_size, *args)
        finally:
            try:
                dist.destroy_process_group()
            except Exception:
                pass
        _send(conn, rank, "ok", result)
    except BaseException as exc:  # noqa: BLE001 - everything goes back to the parent
        status = 1
        try:
            _send(conn, rank, "error", (type(exc).__name__, str(exc), traceback.format_exc()))
        except Exception:
            pass
    finally:
        conn.close()
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:
                pass
    # Skip interpreter teardown (atexit hooks, extension destructors): they can hang after a peer
    # failed, and the result has already been sent.
    os._exit(status)


def _stop(procs) -> None:
    """Terminate, then kill, every process still alive; reap all of them."""
    for p in procs:
        if p.is_alive():
            p.terminate()
    deadline = time.monotonic() + 2.0
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join(5.0)


def run_ranks(fn, world_size, *args, timeout=120, env=None, expect_errors=False):
    """Run fn(rank, world_size, *args) on world_size gloo ranks; return the per-rank results."""
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    ctx = multiprocessing.get_context("spawn")
    payload = pickle.dumps((fn, args))
    child_env = {"OMP_NUM_THREADS": "1"}
    child_env.update({k: str(v) for k, v in (env or {}).items()})
    port = free_port()

    procs, readers = [], {}
    results: list = [None] * world_size
    done: set[int] = set()
    first_error: RankError | None = None
    start = time.monotonic()
    deadline = start + timeout
    try:
        for rank in range(world_size):
            reader, writer = ctx.Pipe(duplex=False)
            p = ctx.Process(
                target=_worker,
                args=(rank, world_size, port, payload, child_env, timeout, writer),
                name=f"rank{rank}",
                daemon=False,  # fn may start processes of its own; cleanup is ours (finally)
            )
            p.start()
            writer.close()  # the parent keeps only the read end, so a dead child reads as EOF
            procs.append(p)
            readers[reader] = rank

        while readers:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            for reader in multiprocessing.connection.wait(list(readers), timeout=remaining):
                rank = readers.pop(reader)
                try:
                    kind, value = pickle.loads(reader.recv_bytes())
                except (EOFError, OSError):
                    procs[rank].join(5.0)
                    code = procs[rank].exitcode
                    kind, value = "error", ("ProcessDied", f"exited with code {code}", "")
                reader.close()
                done.add(rank)
                if kind == "ok":
                    results[rank] = value
                else:
                    err = RankError(rank, *value)
                    results[rank] = err
                    if first_error is None and not expect_errors:
                        first_error = err
                        # Give the other ranks a short while, then stop waiting for them.
                        deadline = min(deadline, time.monotonic() + _GRACE_AFTER_ERROR_S)

        missing = sorted(set(range(world_size)) - done)
        if first_error is not None:
            other = [str(e) for e in results if isinstance(e, RankError) and e is not first_error]
            msg = f"{first_error.full()}"
            if other:
                msg += "\nother ranks: " + "; ".join(other)
            if missing:
                msg += f"\nranks {missing} did not finish and were killed"
            raise AssertionError(msg)
        if missing:
            elapsed = time.monotonic() - start
            raise AssertionError(
                f"ranks {missing} of {world_size} did not finish within timeout={timeout} s "
                f"(waited {elapsed:.1f} s); all ranks were killed"
            )
        return results
    finally:
        for reader in readers:
            reader.close()
        _stop(procs)


_ONCE: dict = {}


def run_once(key, fn):
    """Run ``fn()`` (typically one spawn of many cases) once per test session under ``key``;
    later callers get the same result, or the same failure as an AssertionError."""
    if key not in _ONCE:
        try:
            _ONCE[key] = (True, fn())
        except BaseException as exc:  # noqa: BLE001
            _ONCE[key] = (False, exc)
    ok, value = _ONCE[key]
    if not ok:
        raise AssertionError(f"the {key} run failed:\n{value}")
    return value
