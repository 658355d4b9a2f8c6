"""Multi-process (data parallel) set-up for runs launched with ``torchrun``.

``torchrun`` starts one process per device and sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
``MASTER_ADDR`` and ``MASTER_PORT``. :func:`setup` reads them, picks the backend (NCCL for CUDA,
gloo for CPU) and the device of the local rank, and joins the process group; :func:`teardown`
leaves it. Without those variables (a plain ``python`` or ``flowar`` call) everything here is a
no-op for a world of one process.

The global batch of a step is the same whatever the number of processes: rank ``r`` of ``W``
takes the contiguous rows :func:`shard` gives it.
"""

from __future__ import annotations

import datetime
import logging
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from flowar.devices import parse_device
from flowar.errors import ConfigError

logger = logging.getLogger(__name__)

# Seconds a collective may wait for the other processes before failing (a crashed peer).
DEFAULT_TIMEOUT_S = 1800


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits in the run.

    Attributes:
        rank: global rank (0 is the main process: logging, checkpoints, sample grids).
        world_size: number of processes.
        local_rank: rank on this node (picks the CUDA device).
        device: the device this process trains on.
        backend: "nccl", "gloo", or None for a single process.
        owns_group: whether :func:`setup` created the process group (and must destroy it).
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    backend: str | None = None
    owns_group: bool = False

    @property
    def enabled(self) -> bool:
        """True when more than one process takes part."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _env_int(name: str, default: int) -> int:
    text = os.environ.get(name)
    if text is None or text == "":
        return default
    try:
        return int(text)
    except ValueError:
        raise ConfigError(f"environment variable {name}={text!r} must be an integer") from None


def env_rank() -> int:
    """This process's rank as torchrun announces it (0 outside torchrun)."""
    return _env_int("RANK", 0)


def env_world_size() -> int:
    """The number of processes as torchrun announces it (1 outside torchrun)."""
    return _env_int("WORLD_SIZE", 1)


def setup(device: str | torch.device = "cpu") -> DistInfo:
    """Join the torchrun process group if there is one.

    Args:
        device: the device asked for. Under torchrun, ``"cuda"`` becomes ``cuda:LOCAL_RANK``
            (NCCL backend); ``"cpu"`` uses gloo.

    Returns:
        This process's :class:`DistInfo` (a world of one outside torchrun).
    """
    device = parse_device(device)
    world_size = env_world_size()
    if world_size < 1:
        raise ConfigError(f"WORLD_SIZE must be >= 1, got {world_size}")
    if world_size == 1 and not dist.is_initialized():
        return DistInfo(device=device)

    rank, local_rank = env_rank(), _env_int("LOCAL_RANK", 0)
    if dist.is_initialized():  # the caller set the group up itself
        rank, world_size = dist.get_rank(), dist.get_world_size()
    elif not 0 <= rank < world_size:
        raise ConfigError(f"RANK={rank} must be in [0, WORLD_SIZE={world_size})")
    if device.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise ConfigError(
                f"LOCAL_RANK={local_rank} but only {torch.cuda.device_count()} CUDA device(s) "
                "are visible; start at most that many processes per node (--nproc-per-node)"
            )
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        backend = "nccl"
    elif device.type == "cpu":
        backend = "gloo"
    else:
        raise ConfigError(f"distributed training supports cpu (gloo) and cuda (NCCL), not "
                          f"{device.type!r}")

    owns_group = False
    if not dist.is_initialized():
        for name in ("MASTER_ADDR", "MASTER_PORT"):
            if not os.environ.get(name):
                raise ConfigError(
                    f"WORLD_SIZE={world_size} but {name} is not set; launch with torchrun "
                    "(it sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT)"
                )
        timeout = datetime.timedelta(seconds=_env_int("FLOWAR_DIST_TIMEOUT", DEFAULT_TIMEOUT_S))
        dist.init_process_group(
            backend, rank=rank, world_size=world_size, timeout=timeout,
            device_id=device if device.type == "cuda" else None,
        )
        owns_group = True
    else:
        backend = dist.get_backend()
    info = DistInfo(rank, world_size, local_rank, device, backend, owns_group)
    logger.debug("rank %d of %d on %s (%s)", rank, world_size, device, backend)
    return info


def teardown(info: DistInfo) -> None:
    """Leave the process group if :func:`setup` created it."""
    if info.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def shard(total: int, rank: int, world_size: int) -> slice:
    """The contiguous rows of a batch of ``total`` that ``rank`` of ``world_size`` takes.

    Shares differ by at most one row (the first ``total % world_size`` ranks take one more).
    """
    if total < world_size:
        raise ConfigError(
            f"the global batch ({total}) is smaller than the number of processes "
            f"({world_size}); raise batch_size or start fewer processes"
        )
    base, extra = divmod(total, world_size)
    start = rank * base + min(rank, extra)
    return slice(start, start + base + (1 if rank < extra else 0))


def all_reduce_sum(tensor: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Sum ``tensor`` over all processes in place (a no-op for one process)."""
    if info.enabled:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def broadcast_object(obj: Any, info: DistInfo) -> Any:
    """Rank 0's ``obj`` on every process (picklable objects only)."""
    if not info.enabled:
        return obj
    box = [obj if info.is_main else None]
    dist.broadcast_object_list(box, src=0, device=info.device if info.backend == "nccl" else None)
    return box[0]


def barrier(info: DistInfo) -> None:
    """Wait for every process."""
    if not info.enabled:
        return
    if info.backend == "nccl":
        dist.barrier(device_ids=[info.device.index])
    else:
        dist.barrier()
