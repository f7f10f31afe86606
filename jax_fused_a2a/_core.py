"""Lazy access to the compiled extension `fused_a2a_core`."""

from __future__ import annotations

import functools


@functools.cache
def core_module():
    try:
        import fused_a2a_core
    except ImportError as e:  # pragma: no cover - depends on the installation
        raise ImportError(
            "jax_fused_a2a needs the compiled extension 'fused_a2a_core'; build it with "
            "`pip install --no-build-isolation -e .` (with jax importable at build time so that "
            "the XLA FFI handlers are compiled in)"
        ) from e
    return fused_a2a_core
