"""fused_a2a for JAX: MoE expert-parallel dispatch / combine as XLA FFI custom calls.

    from jax_fused_a2a import dispatch, combine, layout                # normal (DeepEP) mode
    from jax_fused_a2a import hybrid_dispatch, hybrid_combine          # HybridEP mode

See docs/JAX.md and docs/HYBRID.md. Called inside `jax.shard_map` over the EP mesh axis; static
shapes; gradients through `jax.custom_vjp`.
"""

from ._buffers import buffer_info, release_buffers, reset, timeout_seconds
from .hybrid import (
    HybridDispatched,
    HybridHandle,
    hybrid_combine,
    hybrid_dispatch,
    max_permuted_tokens,
)
from .ops import Dispatched, DispatchHandle, clock_ns, combine, dispatch, layout, read_clock

__all__ = [
    "DispatchHandle",
    "Dispatched",
    "HybridDispatched",
    "HybridHandle",
    "buffer_info",
    "clock_ns",
    "combine",
    "dispatch",
    "hybrid_combine",
    "hybrid_dispatch",
    "layout",
    "max_permuted_tokens",
    "read_clock",
    "release_buffers",
    "reset",
    "timeout_seconds",
]
