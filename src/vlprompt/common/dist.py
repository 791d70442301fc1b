"""torch.distributed helpers: start from torchrun's environment, rank/world queries, rank-0-only work, devices.

``torchrun --nproc_per_node N`` sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``;
:func:`init_from_env` starts the process group from them (gloo on CPU, nccl on CUDA, one GPU per ``LOCAL_RANK``).
Without torchrun every helper answers as a single process (rank 0 of 1), so library code can call them
unconditionally. The state lives in torch.distributed's own process group; this module keeps none.
"""

from __future__ import annotations

import datetime
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from vlprompt.errors import ConfigError, RunError

logger = logging.getLogger(__name__)

_ENV_KEYS = ("RANK", "WORLD_SIZE", "LOCAL_RANK")


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits in a torchrun job (rank 0 of 1 outside torchrun)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1


def env_from_torchrun(environ: dict[str, str] | None = None) -> DistEnv:
    """Read ``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK``; a single-process env when they are absent."""
    env = os.environ if environ is None else environ
    if "WORLD_SIZE" not in env:
        return DistEnv()
    try:
        values = {key: int(env.get(key, "0")) for key in _ENV_KEYS}
    except ValueError as exc:
        raise RunError(f"malformed torchrun environment ({', '.join(f'{k}={env.get(k)!r}' for k in _ENV_KEYS)}): "
                       f"{exc}; launch with torchrun --nproc_per_node N") from exc
    if values["WORLD_SIZE"] < 1 or not 0 <= values["RANK"] < values["WORLD_SIZE"] or values["LOCAL_RANK"] < 0:
        raise RunError(f"inconsistent torchrun environment RANK={values['RANK']} WORLD_SIZE={values['WORLD_SIZE']} "
                       f"LOCAL_RANK={values['LOCAL_RANK']}")
    return DistEnv(rank=values["RANK"], world_size=values["WORLD_SIZE"], local_rank=values["LOCAL_RANK"])


def resolve_device(spec: str = "auto") -> torch.device:
    """``auto`` -> ``cuda:LOCAL_RANK`` when CUDA is available (``cuda:0`` outside torchrun), else ``cpu``.

    ``cuda`` alone also means the process's own GPU under torchrun. Raises ConfigError for CUDA without CUDA.
    """
    if spec not in ("auto", "cpu") and not spec.startswith("cuda"):
        raise ConfigError(f"unknown device {spec!r}: use auto, cpu, cuda or cuda:N")
    if spec == "cpu" or (spec == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ConfigError(f"device {spec!r} requested but CUDA is not available (torch {torch.__version__}); "
                          "use --device cpu or auto")
    if spec in ("auto", "cuda"):
        return torch.device("cuda", env_from_torchrun().local_rank % torch.cuda.device_count())
    device = torch.device(spec)
    if device.index is not None and device.index >= torch.cuda.device_count():
        raise ConfigError(f"device {spec!r} requested but only {torch.cuda.device_count()} CUDA device(s) exist")
    return device


def init_from_env(device: str = "auto", *, timeout_s: float = 1800.0) -> DistEnv:
    """Start the default process group from torchrun's variables; a no-op single-process env outside torchrun.

    Backend gloo for CPU, nccl for CUDA (each rank uses ``cuda:LOCAL_RANK``). Idempotent.
    """
    env = env_from_torchrun()
    if not env.is_distributed or dist.is_initialized():
        return env
    target = resolve_device(device)
    backend = "nccl" if target.type == "cuda" else "gloo"
    if target.type == "cuda":
        torch.cuda.set_device(target)
    for key in ("MASTER_ADDR", "MASTER_PORT"):
        if key not in os.environ:
            raise RunError(f"{key} is not set: launch distributed runs with torchrun --nproc_per_node N")
    dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout_s))
    logger.info("distributed: rank %d of %d (local rank %d), backend %s, device %s",
                env.rank, env.world_size, env.local_rank, backend, target)
    return env


def shutdown() -> None:
    """Destroy the default process group if one is running."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


@contextmanager
def distributed(device: str = "auto") -> Iterator[DistEnv]:
    """``with distributed() as env:`` starts the process group under torchrun and always shuts it down."""
    env = init_from_env(device)
    try:
        yield env
    finally:
        if env.is_distributed:
            shutdown()


def is_initialized() -> bool:
    """True when a torch.distributed process group is running in this process."""
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    """This process's global rank (0 without a process group)."""
    return dist.get_rank() if is_initialized() else 0


def world_size() -> int:
    """Number of processes (1 without a process group)."""
    return dist.get_world_size() if is_initialized() else 1


def local_rank() -> int:
    """Rank within this machine, from ``LOCAL_RANK`` (0 outside torchrun)."""
    return env_from_torchrun().local_rank


def is_main_process() -> bool:
    """True on rank 0: the process that writes files and prints progress."""
    return rank() == 0


def barrier() -> None:
    """Wait for every rank (no-op in a single process)."""
    if world_size() > 1:
        dist.barrier()


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """``obj`` of rank ``src`` on every rank (picklable objects, CPU tensors included); identity in one process."""
    if world_size() == 1:
        return obj
    box = [obj if rank() == src else None]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over ranks in place and return it (unchanged in one process)."""
    if world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


@contextmanager
def main_process_first() -> Iterator[None]:
    """Rank 0 runs the block first (e.g. to fill a cache), then the other ranks do."""
    if not is_main_process():
        barrier()
    try:
        yield
    finally:
        if is_main_process():
            barrier()
