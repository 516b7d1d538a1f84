"""Multi-process training through torch's own stack: ``torchrun`` launches, DDP averages.

``torchrun --nproc-per-node N -m export.cli train ...`` (or ``--nnodes``/``--rdzv-endpoint``
for several machines) sets ``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` for every process; a plain
``terratile-export train`` is the one-process case of the same code. CUDA ranks talk NCCL,
CPU ranks gloo. Rank 0 alone writes the run directory; every rank reads its own shard of
each epoch (``DistributedSampler``), and validation logits are gathered so all ranks agree
on the score that picks the best epoch.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Cluster:
    """This process's place among the training processes."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def gather(self, value: Any) -> list[Any]:
        """Every rank's ``value`` (pickled), in rank order; ``[value]`` for one process."""
        if not self.distributed:
            return [value]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, value)
        return out

    def any(self, flag: bool) -> bool:
        """Whether ``flag`` is true on any rank (so all ranks stop together)."""
        return any(self.gather(flag))


def from_env() -> Cluster:
    """The cluster ``torchrun`` described in the environment (one process when unset)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return Cluster(int(os.environ.get("RANK", "0")), world,
                   int(os.environ.get("LOCAL_RANK", "0")))


def start(cluster: Cluster, device: torch.device) -> None:
    """Join the process group (NCCL for CUDA, gloo otherwise) when there are several ranks."""
    if cluster.distributed and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                rank=cluster.rank, world_size=cluster.world_size)


def stop(cluster: Cluster) -> None:
    if cluster.distributed and dist.is_initialized():
        dist.destroy_process_group()
