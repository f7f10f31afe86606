"""numpy <-> torch conversions that keep every bit (bf16 goes through an int16 view)."""

from __future__ import annotations

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
