"""numpy <-> torch conversions that keep every bit (bf16 goes through an int16 view), and a
counter of autograd Function calls."""

from __future__ import annotations

import contextlib

import ml_dtypes
import numpy as np
import torch

BF16 = np.dtype(ml_dtypes.bfloat16)

# short name -> (torch dtype, numpy dtype)
DTYPES = {
    "bf16": (torch.bfloat16, BF16),
    "fp16": (torch.float16, np.dtype(np.float16)),
    "fp32": (torch.float32, np.dtype(np.float32)),
}


def to_numpy(t: torch.Tensor) -> np.ndarray:
    """A detached CPU copy as numpy; bf16 becomes ml_dtypes.bfloat16 with the same bits."""
    t = t.detach().cpu().contiguous()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(BF16).copy()
    return t.numpy().copy()


def from_numpy(a: np.ndarray) -> torch.Tensor:
    """A torch tensor (own memory) with the same bits; ml_dtypes.bfloat16 becomes torch.bfloat16."""
    a = np.ascontiguousarray(a)
    if a.dtype == BF16:
        return torch.from_numpy(a.view(np.int16).copy()).view(torch.bfloat16)
    return torch.from_numpy(a.copy())


def assert_same_routes(direct: list, layered: list, cases) -> None:
    """The per-rank results of one suite run twice, through _ops.run's direct route and with
    FUSED_A2A_TORCH_DIRECT=0 (torch.library's route): each run took only its own route, and every
    case's results (arrays bitwise, other values equal) are the same."""
    from reference import assert_bitwise_equal

    for r, (d, lay) in enumerate(zip(direct, layered, strict=True)):
        assert d["_routes"]["op"] == 0 and d["_routes"]["direct"] > 0, d["_routes"]
        assert lay["_routes"]["direct"] == 0 and lay["_routes"]["op"] > 0, lay["_routes"]
        for case in cases:
            got, exp = lay[case.name], d[case.name]
            assert "error" not in got and "error" not in exp, (got.get("error"), exp.get("error"))
            assert got.keys() == exp.keys(), (r, case.name)
            for key, value in exp.items():
                if isinstance(value, np.ndarray):
                    assert_bitwise_equal(got[key], value, f"rank {r} {case.name} {key}")
                else:
                    assert got[key] == value, (r, case.name, key)


@contextlib.contextmanager
def counted_applies(*functions):
    """While in the block, counts the calls of each autograd Function's apply: yields a list that
    gets one entry a call."""
    calls = []
    for cls in functions:
        real = cls.apply

        def counted(*args, _real=real):
            calls.append(1)
            return _real(*args)

        cls.apply = counted
    try:
        yield calls
    finally:
        for cls in functions:
            del cls.apply  # the inherited Function.apply again
