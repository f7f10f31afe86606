"""torch_fused_a2a: a drop-in for Megatron / NeMo AutoModel ``fused_a2a`` on fused_a2a kernels.

from torch_fused_a2a import fused_dispatch, fused_combine          # normal (DeepEP) mode
"""

from torch_fused_a2a import _ops  # noqa: F401  (registers torch.ops.fused_a2a.*)
from torch_fused_a2a import fused_a2a as _module
from torch_fused_a2a import hybrid_ep as _hybrid_module
from torch_fused_a2a.fused_a2a import (
    DispatchHandle,
    FusedCombine,
    FusedDispatch,
    _is_nvshmem_available,
    fused_combine,
    fused_dispatch,
    get_buffer,
    get_hidden_bytes,
    set_deepep_num_sms,
)
from torch_fused_a2a.hybrid_ep import (
    HybridEPCombine,
    HybridEPDispatch,
    HybridEPHandle,
    hybrid_ep_combine,
    hybrid_ep_dispatch,
    init_hybrid_ep_buffer,
    reset_hybrid_ep_buffer,
)

__all__ = [
    "DispatchHandle",
    "FusedCombine",
    "FusedDispatch",
    "_is_nvshmem_available",
    "fused_combine",
    "fused_dispatch",
    "get_buffer",
    "get_hidden_bytes",
    "set_deepep_num_sms",
    "HybridEPCombine",
    "HybridEPDispatch",
    "HybridEPHandle",
    "hybrid_ep_combine",
    "hybrid_ep_dispatch",
    "init_hybrid_ep_buffer",
    "reset_hybrid_ep_buffer",
]


def __getattr__(name):
    # Module globals that upstream code reads (`_buffer`, `_nvshmem_available`) live in the
    # fused_a2a submodule; read them through so that they are always current.
    if name in ("_buffer", "_nvshmem_available", "_num_sms"):
        return getattr(_module, name)
    if name == "_hybrid_ep_buffer":
        return _hybrid_module._hybrid_ep_buffer
    raise AttributeError(name)
