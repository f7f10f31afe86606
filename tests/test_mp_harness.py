"""Self-tests of tests/mp.py (the multi-process gloo harness)."""

from __future__ import annotations

import os
import time

import numpy as np
import pytest
from mp import RankError, run_ranks


def _allreduce(rank, world_size, scale):
    import torch
    import torch.distributed as dist

    t = torch.full((3,), float(rank + 1))
    dist.all_reduce(t)
    return {
        "rank": rank,
        "world": dist.get_world_size(),
        "sum": t.numpy() * scale,
        "env": os.environ.get("MP_TEST_VAR"),
    }


def _fail_on_rank1(rank, world_size):
    if rank == 1:
        raise ValueError("boom from rank one")
    return rank


def _raise_on_1_die_on_2(rank, world_size):
    if rank == 1:
        raise ValueError("boom from rank one")
    if rank == 2:
        os._exit(7)
    return rank


def _hang_on_rank1(rank, world_size):
    if rank == 1:
        time.sleep(300)
    return rank


def test_results_come_back():
    res = run_ranks(_allreduce, 3, 2.0, timeout=60, env={"MP_TEST_VAR": "hello"})
    assert [r["rank"] for r in res] == [0, 1, 2]
    for r in res:
        assert r["world"] == 3
        assert r["env"] == "hello"
        np.testing.assert_array_equal(r["sum"], np.full(3, 12.0))


def test_exception_is_reported():
    with pytest.raises(AssertionError, match=r"(?s)rank 1 raised ValueError: boom from rank one"):
        run_ranks(_fail_on_rank1, 2, timeout=60)


def test_expected_errors_are_returned():
    res = run_ranks(_raise_on_1_die_on_2, 3, timeout=60, expect_errors=True)
    assert res[0] == 0
    assert isinstance(res[1], RankError)
    assert res[1].rank == 1 and res[1].type_name == "ValueError"
    assert "boom from rank one" in res[1].message
    assert "_raise_on_1_die_on_2" in res[1].traceback
    assert isinstance(res[2], RankError) and res[2].type_name == "ProcessDied"
    assert "code 7" in res[2].message


def test_hang_is_caught_within_timeout():
    start = time.monotonic()
    with pytest.raises(AssertionError, match=r"ranks \[1\] of 2 did not finish"):
        run_ranks(_hang_on_rank1, 2, timeout=8)
    assert time.monotonic() - start < 14
