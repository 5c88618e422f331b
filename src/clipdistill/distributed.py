"""One code path for 1 and N processes: `torchrun` sets the env, we read it."""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_nn

from clipdistill.config import ConfigError


def resolve_device(name: str) -> torch.device:
    """The device `auto` (CUDA when there is one) or `name` means; CUDA asked for but absent is refused."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(
            f"device {name!r} requested but CUDA is not available here (use --train.device cpu)"
        )
    return torch.device(name)


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device: torch.device) -> DistInfo:
    """Join the process group that `torchrun` describes; world size 1 needs no group."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return DistInfo()
    if not dist.is_initialized():
        # gloo serves the CPU tensors (logged values, batch sizes) that NCCL alone would reject
        backend = "cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend)
    return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()


def all_gather_objects(obj: object) -> list:
    """`obj` of every rank, in rank order (picklable values: small results, not tensors)."""
    if world_size() == 1:
        return [obj]
    out = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_array(array: np.ndarray | None) -> np.ndarray:
    """Rank 0's array on every rank (other ranks pass None)."""
    if world_size() == 1:
        return array
    box = [array]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def sum_disjoint_(array: np.ndarray) -> np.ndarray:
    """In place: the sum over ranks of an integer array that each rank filled in its own rows (zeros
    elsewhere), i.e. every rank's rows in one array, on every rank."""
    if world_size() > 1:
        dist.all_reduce(torch.from_numpy(array))
    return array


def all_gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate `x` from every rank along dim 0, keeping gradients for the local part.

    Equal-sized shards are assumed (the sampler guarantees it).
    """
    if world_size() == 1:
        return x
    return torch.cat(dist_nn.all_gather(x), dim=0)


def all_reduce_mean(x: torch.Tensor) -> torch.Tensor:
    """Mean of a detached tensor over ranks (for logging)."""
    if world_size() == 1:
        return x
    x = x.detach().clone()
    dist.all_reduce(x)
    return x / world_size()
