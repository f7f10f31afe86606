"""Pieces shared by the torch and JAX frontends (no torch or jax imports here)."""

from __future__ import annotations

import hashlib
import os

import fused_a2a_core as core

PLATFORM_CPU = 0
PLATFORM_CUDA = 1

# Core dtype codes (csrc/include/fused_a2a/config.h).
DTYPE_F32, DTYPE_F16, DTYPE_BF16, DTYPE_E4M3, DTYPE_I32, DTYPE_I64, DTYPE_BOOL = range(7)


def build_info() -> dict:
    """What the compiled core contains (CUDA, arch, XLA FFI) and how many GPUs it sees."""
    info = dict(core.build_info())
    info["cuda_devices"] = core.cuda_device_count()
    return info


def stable_group_id(*parts: object) -> int:
    """A 63-bit id that is the same in every process for the same description of a group."""
    digest = hashlib.sha256("/".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def kernel_sms(num_sms: int | None) -> int:
    """The SMs the CUDA normal-mode kernels run on, as csrc/kernels/cuda/state.cu picks them:
    FUSED_A2A_CUDA_BLOCKS when set, else num_sms when positive, else 24 (so a bench run with the
    override reports the SMs it used)."""
    env = os.environ.get("FUSED_A2A_CUDA_BLOCKS")
    if env:
        return int(env)
    return num_sms if num_sms and num_sms > 0 else 24
