"""One JAX primitive for every fused_a2a XLA FFI target.

Why a primitive of our own rather than `jax.ffi.ffi_call`: the buffer of an EP group can only be
created once the mesh's devices are known, and inside `shard_map` that is at lowering time (the
trace only sees an abstract mesh). The lowering rule below finds the mesh in the lowering context,
bootstraps (or reuses) the group's buffers, and then emits the ordinary FFI custom call with the
group id as an attribute. Abstract evaluation is JAX's own `ffi_call` rule (types, varying manual
axes); `vmap` raises NotImplementedError.
"""

from __future__ import annotations

import threading
from typing import Any

import jax
import numpy as np
from jax.interpreters import batching, mlir

try:
    from jax.extend.core import Primitive
except ImportError:  # pragma: no cover - older jax
    from jax.core import Primitive

from . import _buffers
from ._core import core_module

try:
    from jax._src.ffi import ffi_call_abstract_eval as _jax_ffi_abstract_eval
except ImportError:  # pragma: no cover - jax moved it
    _jax_ffi_abstract_eval = None

fa2a_call_p = Primitive("fused_a2a_call")
fa2a_call_p.multiple_results = True


def _abstract_eval(*avals_in, result_avals, **_):
    if _jax_ffi_abstract_eval is not None:
        return _jax_ffi_abstract_eval(*avals_in, result_avals=result_avals, has_side_effect=False)
    return list(result_avals), set()


fa2a_call_p.def_effectful_abstract_eval(_abstract_eval)


def _eager_impl(*args, **params):  # eager calls (e.g. layout outside jit) compile the primitive
    from jax._src import dispatch as jax_dispatch

    return jax_dispatch.apply_primitive(fa2a_call_p, *args, **params)


fa2a_call_p.def_impl(_eager_impl)


def _batching_rule(*args, target, **_):
    raise NotImplementedError(
        f"fused_a2a: jax.vmap of {_OP_NAMES.get(target, target)} is not supported; the ops are "
        "collectives over the EP mesh axis with static per-device shapes. Call them once per "
        "device inside jax.shard_map, or fold the batch dimension into the token dimension."
    )


batching.primitive_batchers[fa2a_call_p] = _batching_rule

_OP_NAMES = {
    "fa2a_layout": "layout",
    "fa2a_dispatch": "dispatch",
    "fa2a_cached_dispatch": "combine's backward (cached dispatch)",
    "fa2a_combine": "combine",
    "fa2a_combine_weighted": "dispatch's backward (weighted combine)",
    "fa2a_hybrid_dispatch": "hybrid_dispatch",
    "fa2a_hybrid_cached_dispatch": "hybrid_combine's backward (cached hybrid dispatch)",
    "fa2a_hybrid_combine": "hybrid_combine",
}

_registered: set[str] = set()
_register_lock = threading.Lock()


def ensure_registered(platform: str) -> None:
    """Register the FFI targets of `platform` ('cpu' or 'CUDA') with XLA, once."""
    with _register_lock:
        if platform in _registered:
            return
        core = core_module()
        targets = core.ffi_targets(platform)
        if not targets:
            info = core.build_info()
            if not info.get("xla_ffi", False):
                raise RuntimeError(
                    "fused_a2a: this build of fused_a2a_core has no XLA FFI handlers (jax was not "
                    "importable when it was built); rebuild with jax installed"
                )
            raise NotImplementedError(
                f"fused_a2a: no XLA FFI handlers for platform {platform!r} in this build "
                f"(compiled platforms: {list(core.ffi_platforms())})"
            )
        for name, capsule in targets.items():
            jax.ffi.register_ffi_target(name, capsule, platform=platform, api_version=1)
        _registered.add(platform)


def _ffi_platform(ctx) -> str:
    platforms = tuple(ctx.module_context.platforms)
    if len(platforms) != 1:
        raise NotImplementedError(
            f"fused_a2a: lowering for several platforms at once ({platforms}) is not supported"
        )
    p = platforms[0].lower()
    if p == "cpu":
        return "cpu"
    if p in ("cuda", "gpu"):
        return "CUDA"
    raise NotImplementedError(f"fused_a2a: platform {platforms[0]!r} is not supported (cpu, cuda)")


def _mesh_of(ctx, axis_name: str):
    from jax._src import sharding_impls

    axis_ctx = ctx.module_context.axis_context
    mesh = (
        getattr(axis_ctx, "mesh", None)
        if isinstance(axis_ctx, sharding_impls.SPMDAxisContext)
        else None
    )
    if mesh is not None and not hasattr(mesh, "devices"):
        mesh = None  # an AbstractMesh
    if mesh is None:
        try:
            from jax._src.mesh import get_concrete_mesh

            concrete = get_concrete_mesh()
            mesh = None if concrete is None or concrete.empty else concrete
        except ImportError:  # pragma: no cover
            mesh = None
    if mesh is None or axis_name not in tuple(mesh.axis_names):
        raise NotImplementedError(
            f"fused_a2a: cannot find the devices of mesh axis {axis_name!r} while lowering; call "
            "the op inside jax.shard_map with a concrete jax.sharding.Mesh (or under "
            "jax.set_mesh(mesh))"
        )
    return mesh


def _lowering(ctx, *operands, target, result_avals, attrs, aliases, group):
    del result_avals
    platform = _ffi_platform(ctx)
    ensure_registered(platform)
    kwargs: dict[str, Any] = {k: np.int64(v) for k, v in attrs}
    if group is not None:
        axis_name, hidden_bytes, num_topk, *min_slot = group
        mesh = _mesh_of(ctx, axis_name)
        base = _buffers.ensure_group(mesh, axis_name, platform, hidden_bytes, num_topk, *min_slot)
        kwargs["group_id"] = np.int64(base)
    extra = {"operand_output_aliases": dict(aliases)} if aliases else {}
    rule = jax.ffi.ffi_lowering(target, **extra)
    return rule(ctx, *operands, **kwargs)


mlir.register_lowering(fa2a_call_p, _lowering)


def call(target: str, operands, result_avals, *, attrs=(), aliases=(), group=None):
    """Bind the primitive. `group`: (axis_name, hidden_bytes, num_topk[, min_slot_bytes]) for
    collective targets (see `_buffers.ensure_group`)."""
    return fa2a_call_p.bind(
        *operands,
        target=target,
        result_avals=tuple(result_avals),
        attrs=tuple(sorted(attrs)),
        aliases=tuple(aliases),
        group=group,
    )
