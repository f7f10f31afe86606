"""fused_a2a for JAX: MoE expert-parallel dispatch / combine as XLA FFI custom calls.

    from jax_fused_a2a import dispatch, combine, layout

See docs/JAX.md. Called inside `jax.shard_map` over the EP mesh axis; static shapes; gradients
through `jax.custom_vjp`.
"""

from ._buffers import buffer_info, release_buffers, reset, timeout_seconds
from .ops import Dispatched, DispatchHandle, combine, dispatch, layout

__all__ = [
    "DispatchHandle",
    "Dispatched",
    "buffer_info",
    "combine",
    "dispatch",
    "layout",
    "release_buffers",
    "reset",
    "timeout_seconds",
]
