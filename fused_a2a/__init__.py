"""fused_a2a: fast expert-parallel MoE dispatch/combine for JAX and PyTorch.

The compiled core is the top-level extension module ``fused_a2a_core``; the frontends are
``torch_fused_a2a`` and ``jax_fused_a2a``. This package holds what both share (group ids, buffer
sizing helpers) and the ``fused-a2a`` command line.
"""

from fused_a2a._common import build_info

__all__ = ["build_info"]
__version__ = "0.1.0"
