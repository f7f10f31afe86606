"""The torch side of the common buffer manager: one core buffer per (ProcessGroup, platform).

Bootstrap: each rank creates its region in the core, the infos are all-gathered over the group
(``all_gather_object``), every rank maps its peers, a second all-gather acts as a barrier, and
each rank drops its shared-memory name (``seal``). The core's registry holds the memory; this
module holds the Python handle (``Buffer``) that Megatron-style code keeps in ``_buffer``.
"""

from __future__ import annotations

import threading
import warnings
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

import fused_a2a_core as core
from fused_a2a._common import PLATFORM_CPU, PLATFORM_CUDA, stable_group_id
from torch_fused_a2a import _arena

_generation_lock = threading.Lock()
_generations: dict[tuple, int] = {}


def group_ranks(group) -> list[int]:
    """Global ranks of ``group`` in group-rank order."""
    return list(dist.get_process_group_ranks(group))


def _next_generation(key: tuple) -> int:
    # Every rank creates buffers for a group in the same order, so counters agree across ranks.
    with _generation_lock:
        _generations[key] = _generations.get(key, 0) + 1
        return _generations[key]


def platform_of(device: torch.device) -> tuple[int, int]:
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return PLATFORM_CUDA, index
    if device.type == "cpu":
        return PLATFORM_CPU, 0
    raise ValueError(f"fused_a2a supports CPU and CUDA tensors, got device {device}")


def default_device(group) -> torch.device:
    """CUDA (the current device) for NCCL groups, else CPU."""
    backend = str(dist.get_backend(group)).lower()
    if "nccl" in backend and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


@dataclass
class Buffer:
    """A connected core buffer for one ProcessGroup (the object upstream code calls ``_buffer``)."""

    group: object
    group_id: int
    rank: int
    num_ranks: int
    platform: int
    device_index: int
    num_nvl_bytes: int
    num_rdma_bytes: int = 0
    released: bool = field(default=False)
    # The largest row size (bytes) get_buffer found this buffer big enough for
    checked_hidden_bytes: int = field(default=0)

    @property
    def device(self) -> torch.device:
        if self.platform == PLATFORM_CUDA:
            return torch.device("cuda", self.device_index)
        return torch.device("cpu")

    def bytes_held(self) -> int:
        return 0 if self.released else core.buffer_data_bytes(self.group_id, self.rank)

    def poisoned(self) -> str:
        return core.buffer_poisoned(self.group_id, self.rank)

    def release(self) -> None:
        if not self.released:
            _arena.unregister(self.group_id)  # live arena tensors keep their memory
            core.buffer_release(self.group_id)
            self.released = True


def _create_default_arena(
    group, num_ranks: int, create, release, arena_bytes: int
) -> tuple[str, bool]:
    """(this rank's info, with the arena): the default arena (not asked for by the user) costs
    device memory a drop-in user did not budget, so where any rank cannot allocate it, every rank
    creates its buffer without one (collective), with a warning, instead of failing."""
    try:
        info, error = create(arena_bytes), None
    except RuntimeError as err:
        info, error = None, err
    oks: list = [None] * num_ranks
    dist.all_gather_object(oks, info is not None, group=group)
    if all(oks):
        return info, True
    if info is not None:
        release()
    failed = [r for r, ok in enumerate(oks) if not ok]
    warnings.warn(
        f"fused_a2a: no room for the default {arena_bytes >> 20} MB output arena on ranks "
        f"{failed} ({error or 'another rank'}); the torch buffers go without one (rows through "
        "the receive window). FUSED_A2A_TORCH_ARENA_MB sets its size, 0 turns it off.",
        RuntimeWarning,
        stacklevel=4,
    )
    return create(0), False


def create_buffer(group, data_bytes: int, device: torch.device, tag: str = "normal") -> Buffer:
    """Collective: every rank of ``group`` must call this with the same ``data_bytes`` and the
    same FUSED_A2A_TORCH_ARENA_MB (a normal-mode buffer's output arena: torch_fused_a2a/_arena.py).
    """
    platform, device_index = platform_of(device)
    arena_bytes = _arena.arena_bytes_env(platform == PLATFORM_CUDA) if tag == "normal" else 0
    ranks = group_ranks(group)
    generation = _next_generation((tag, tuple(ranks), platform))
    group_id = stable_group_id("torch", tag, ranks, platform, generation)
    rank = dist.get_rank(group)
    num_ranks = dist.get_world_size(group)
    if platform == PLATFORM_CUDA:
        torch.cuda.synchronize(device_index)

    def create(arena: int) -> str:
        return core.buffer_create(
            group_id, rank, num_ranks, data_bytes, platform, device_index, arena
        )

    if arena_bytes and _arena.arena_is_default():
        info, with_arena = _create_default_arena(
            group, num_ranks, create, lambda: core.buffer_release(group_id), arena_bytes
        )
        arena_bytes = arena_bytes if with_arena else 0
    else:
        info = create(arena_bytes)
    infos: list = [None] * num_ranks
    try:
        dist.all_gather_object(infos, info, group=group)
        core.buffer_connect(group_id, rank, infos)
        # Barrier: every peer has mapped our region before we drop its name.
        done: list = [None] * num_ranks
        dist.all_gather_object(done, True, group=group)
    except BaseException:
        core.buffer_release(group_id)
        raise
    core.buffer_seal(group_id, rank)
    if arena_bytes:
        _arena.register(group_id, rank, device)
    return Buffer(group, group_id, rank, num_ranks, platform, device_index, data_bytes)
