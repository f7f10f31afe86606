"""Communication buffers of the JAX frontend: group ids and the bootstrap.

The buffers live in the core's process-wide registry (the same one the torch frontend uses), keyed
by (group id, rank). The JAX frontend creates them while lowering a program (that is when the mesh's
devices are known), once per (mesh axis, device set) and generation:

* one process holding every device of the group: create each local rank's buffer, hand every rank
  the list of infos, seal;
* several processes (``jax.distributed``): each process creates its local ranks' buffers and
  all-gathers the infos through the distributed key-value store, with keys unique per group and
  generation, every wait bounded by ``FUSED_A2A_TIMEOUT_S``.

A mesh with several axes holds one EP group per slice along the other axes; slice ``s`` uses the
buffer id ``group_base + s`` (``group_base`` has its low 16 bits clear).

A buffer grows (a new generation: fresh buffers under a new group id) only when one row of a later
call does not fit; buffers of earlier generations stay alive because compiled programs refer to them
by id. ``release_buffers()`` frees them all.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import threading

import numpy as np

from ._core import core_module

_SUB_BITS = 16
_BASE_MASK = (1 << 63) - 1 - ((1 << _SUB_BITS) - 1)

PLATFORM_IDS = {"cpu": 0, "CUDA": 1}


def timeout_seconds() -> float:
    """The bound on every wait for a peer (``FUSED_A2A_TIMEOUT_S``, default 100 s)."""
    try:
        value = float(os.environ.get("FUSED_A2A_TIMEOUT_S", "100"))
    except ValueError:
        value = 100.0
    return value if value > 0 else 100.0


@dataclasses.dataclass
class _Group:
    key: str
    generation: int
    base: int
    data_bytes: int
    num_subgroups: int
    num_ranks: int
    local: list  # [(buffer group id, rank)] created in this process


_lock = threading.Lock()
_groups: dict[str, _Group] = {}  # live generation of each (axis, devices, platform)
_generations: dict[str, int] = {}  # next generation per key (never reset: keys stay unique)
_all_ids: set[int] = set()  # every buffer group id this frontend created and has not released


def _group_base(key: str, generation: int) -> int:
    digest = hashlib.blake2b(f"{key}#{generation}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & _BASE_MASK


def _row_bytes(hidden_bytes: int, num_topk: int) -> int:
    # One row as the core moves it: the hidden values plus per-row metadata (index, weights,
    # counters). Generous on purpose: only used to decide whether a buffer must grow.
    return hidden_bytes + 8 * num_topk + 64


def _payload_bytes(data_bytes: int, num_ranks: int) -> int:
    # The data region holds one slot per peer (64-byte aligned), each with a 64-byte header.
    return ((data_bytes // num_ranks) & ~63) - 64


def _device_ordinal(device, platform: str) -> int:
    if platform == "CUDA":
        return int(getattr(device, "local_hardware_id", device.id))
    return int(device.id)


def groups_of(mesh, axis_name: str) -> np.ndarray:
    """[S, G] array of devices: row s is the EP group of slice s along the other mesh axes."""
    names = tuple(mesh.axis_names)
    if axis_name not in names:
        raise ValueError(f"axis_name {axis_name!r} is not an axis of the mesh {names}")
    devices = np.asarray(mesh.devices)
    pos = names.index(axis_name)
    devices = np.moveaxis(devices, pos, -1)
    return devices.reshape(-1, devices.shape[-1])


def _slot_bytes(data_bytes: int, num_ranks: int) -> int:
    return (data_bytes // num_ranks) & ~63


def ensure_group(
    mesh, axis_name: str, platform: str, hidden_bytes: int, num_topk: int, min_slot_bytes: int = 0
) -> int:
    """The base group id for `axis_name` of `mesh`, bootstrapping or growing its buffers.

    Normal mode sizes by one row (`hidden_bytes`, `num_topk`); HybridEP ops also pass
    `min_slot_bytes`, the per-peer slot the core needs for one round of each of their ops."""
    core = core_module()
    groups = groups_of(mesh, axis_name)
    num_sub, num_ranks = groups.shape
    ids = ",".join(str(d.id) for d in groups.reshape(-1))
    key = f"{axis_name}|{platform}|{num_sub}x{num_ranks}|{ids}"
    row = _row_bytes(hidden_bytes, num_topk)
    with _lock:
        group = _groups.get(key)
        fits = (
            group is not None
            and row <= _payload_bytes(group.data_bytes, num_ranks)
            and min_slot_bytes <= _slot_bytes(group.data_bytes, num_ranks)
        )
        if fits and _alive(core, group):
            return group.base
        want = int(
            core.recommended_buffer_bytes(int(hidden_bytes), num_ranks, PLATFORM_IDS[platform])
        )
        if group is not None:  # never shrink; grow at least 2x when a row does not fit
            want = max(want, group.data_bytes if fits else 2 * group.data_bytes)
        while (
            _payload_bytes(want, num_ranks) < row or _slot_bytes(want, num_ranks) < min_slot_bytes
        ):
            want *= 2
        generation = _generations.get(key, 0)
        _generations[key] = generation + 1
        base = _group_base(key, generation)
        local = _bootstrap(core, base, groups, platform, want)
        _groups[key] = _Group(key, generation, base, want, num_sub, num_ranks, local)
        return base


def _alive(core, group: _Group) -> bool:
    """False when the buffers were released behind our back, or (groups held entirely by this
    process) an error left one unusable. Across processes that decision must be collective: there
    the user calls reset() on every process."""
    if any(core.buffer_data_bytes(gid, rank) <= 0 for gid, rank in group.local):
        return False
    poisoned = getattr(core, "buffer_poisoned", None)
    if poisoned is None or len(group.local) < group.num_subgroups * group.num_ranks:
        return True
    return not any(poisoned(gid, rank) for gid, rank in group.local)


def _bootstrap(core, base: int, groups: np.ndarray, platform: str, data_bytes: int) -> list:
    import jax

    me = jax.process_index()
    num_ranks = groups.shape[1]
    plat = PLATFORM_IDS[platform]
    created: list = []
    created_ids: list[int] = []
    try:
        plans = []  # (gid, {rank: device}, all ranks local?)
        for sub in range(groups.shape[0]):
            row = groups[sub]
            local = {r: d for r, d in enumerate(row) if d.process_index == me}
            if local:
                plans.append((base + sub, local, len(local) == num_ranks))
        infos_local = {}
        for gid, local, _ in plans:
            created_ids.append(gid)
            for r, d in local.items():
                ordinal = _device_ordinal(d, platform)
                info = core.buffer_create(gid, r, num_ranks, data_bytes, plat, ordinal)
                created.append((gid, r))
                infos_local[(gid, r)] = bytes(info)
                core.ffi_bind_device(base, ordinal, gid)
        for gid, local, all_local in plans:
            if all_local:
                infos = [infos_local[(gid, r)] for r in range(num_ranks)]
            else:
                infos = _kv_allgather(gid, local, infos_local, num_ranks)
            for r in local:
                core.buffer_connect(gid, r, infos)
        for gid, local, all_local in plans:
            if not all_local:
                _kv_barrier(gid, local, num_ranks)
            for r in local:
                core.buffer_seal(gid, r)
    except BaseException:
        for gid in created_ids:
            core.buffer_release(gid)
        core.ffi_unbind_group(base)
        raise
    _all_ids.update(created_ids)
    return created


def _kv_client():
    from jax._src import distributed

    client = getattr(distributed.global_state, "client", None)
    if client is None:
        raise RuntimeError(
            "fused_a2a: the EP group spans several processes but jax.distributed is not "
            "initialised; call jax.distributed.initialize() first"
        )
    return client


def _kv_allgather(gid: int, local: dict, infos_local: dict, num_ranks: int) -> list[bytes]:
    client = _kv_client()
    for r in local:
        client.key_value_set_bytes(f"fused_a2a/{gid}/info/{r}", infos_local[(gid, r)])
    timeout_ms = int(timeout_seconds() * 1000)
    infos = []
    for r in range(num_ranks):
        try:
            infos.append(
                bytes(client.blocking_key_value_get_bytes(f"fused_a2a/{gid}/info/{r}", timeout_ms))
            )
        except Exception as e:  # the client raises its own error type
            raise _timeout(
                f"buffer bootstrap of group {gid}: rank {r} did not publish its "
                f"buffer info within {timeout_seconds():g} s ({e})"
            ) from e
    return infos


def _kv_barrier(gid: int, local: dict, num_ranks: int) -> None:
    client = _kv_client()
    for r in local:
        client.key_value_set(f"fused_a2a/{gid}/connected/{r}", "1")
    timeout_ms = int(timeout_seconds() * 1000)
    for r in range(num_ranks):
        try:
            client.blocking_key_value_get(f"fused_a2a/{gid}/connected/{r}", timeout_ms)
        except Exception as e:
            raise _timeout(
                f"buffer bootstrap of group {gid}: rank {r} did not connect within "
                f"{timeout_seconds():g} s ({e})"
            ) from e


def _timeout(message: str) -> Exception:
    core = core_module()
    kind = getattr(core, "TimeoutError", TimeoutError)
    return kind("fused_a2a: " + message)


def release_buffers() -> None:
    """Free every buffer the JAX frontend created in this process.

    Programs compiled before this call refer to the freed buffers: run nothing that is in flight,
    and call ``jax.clear_caches()`` so that the next call lowers (and bootstraps) again.
    """
    core = core_module()
    with _lock:
        for gid in sorted(_all_ids):
            core.buffer_release(gid)
        for group in _groups.values():
            core.ffi_unbind_group(group.base)
        _all_ids.clear()
        _groups.clear()


def buffer_info() -> dict:
    """{key: {'generation', 'group_id', 'data_bytes', 'local_ranks'}} of the live groups."""
    with _lock:
        return {
            k: {
                "generation": g.generation,
                "group_id": g.base,
                "data_bytes": g.data_bytes,
                "local_ranks": list(g.local),
            }
            for k, g in _groups.items()
        }


def reset() -> None:
    """Free every buffer of the JAX frontend and clear JAX's caches of compiled programs, so that
    the next call lowers again and bootstraps fresh buffers. Use it after an op failed (a timeout,
    a bad index on one rank) and left its buffer unusable. With several processes, every process
    must call it (the next bootstrap is collective)."""
    import jax

    release_buffers()
    jax.clear_caches()
