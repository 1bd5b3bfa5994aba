"""Running under ``torchrun``: process group, data sharding, and reductions across ranks.

``torchrun --nproc_per_node N -m medunet train ...`` starts N processes with ``RANK``, ``WORLD_SIZE`` and
``LOCAL_RANK`` set; each builds the same model and trains it under PyTorch's DistributedDataParallel
(NCCL between GPUs, gloo between CPU processes). A plain ``medunet train`` is the world of one, and
every helper here is then a no-op, so the loop has a single code path.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch.utils.data import DistributedSampler

log = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def current_world() -> World:
    """This process's place, from the environment ``torchrun`` sets (a world of one otherwise)."""
    return World(
        rank=int(os.environ.get("RANK", "0")),
        size=int(os.environ.get("WORLD_SIZE", "1")),
        local_rank=int(os.environ.get("LOCAL_RANK", "0")),
    )


def init_world(device: torch.device) -> World:
    """Join the process group when launched by torchrun: NCCL for CUDA devices, gloo for CPUs."""
    world = current_world()
    if world.distributed and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend=backend)
        log.info("rank %d of %d joined the %s process group", world.rank, world.size, backend)
    return world


def close_world() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def sum_across(values: torch.Tensor) -> torch.Tensor:
    """Sum of ``values`` over all ranks (a copy; ``values`` itself is left alone)."""
    total = values.detach().clone()
    if dist.is_initialized():
        dist.all_reduce(total)
    return total


def differentiable_sum(values: torch.Tensor) -> torch.Tensor:
    """Sum over ranks that gradients flow back through (each rank's share gets the gradient of the sum)."""
    if not dist.is_initialized():
        return values
    from torch.distributed.nn.functional import all_reduce

    return all_reduce(values)


def gather_objects(obj: T) -> list[T]:
    """Every rank's ``obj``, in rank order, on every rank."""
    if not dist.is_initialized():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def from_main(obj: T) -> T:
    """Rank 0's ``obj`` on every rank (for decisions that must agree, such as stopping)."""
    if not dist.is_initialized():
        return obj
    box: list[Any] = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


class EpochSampler(DistributedSampler):  # type: ignore[type-arg]
    """This rank's share of a seeded shuffle, yielding ``epoch * len(dataset) + index``.

    The permutation depends only on the seed and the epoch, and rank ``r`` takes every ``size``-th
    element of it, so step ``k`` of all ranks together covers exactly the samples of step ``k`` of a
    single process with the same global batch. The epoch travels inside each index, so a dataset
    that seeds its random transforms from (epoch, index) draws the same crop of a case whichever
    rank or loader worker (persistent or not) handles it.
    """

    def __init__(self, dataset: Any, world: World, seed: int) -> None:
        super().__init__(dataset, num_replicas=world.size, rank=world.rank, shuffle=True, seed=seed, drop_last=True)

    def __iter__(self) -> Iterator[int]:
        n = len(self.dataset)  # type: ignore[arg-type]
        for index in super().__iter__():
            yield self.epoch * n + index
