"""The tensor-parallel group of one worker process, and the collectives a sharded model needs.

Every rank of a tensor-parallel model runs the same step on its shard of the weights;
their partial results meet in two collectives: `all_reduce` (the sum of the row-parallel
projections and of the vocabulary-parallel embedding) and `gather_to_first` (the
vocabulary shards of the logits, needed only by rank 0, which samples). One rank, the
common case, is `TensorParallelGroup.single()`: both are then the identity, and no
torch.distributed state exists at all.
"""
from __future__ import annotations

import datetime
from dataclasses import dataclass

import torch
import torch.distributed as dist

from heron.logger import get_logger

logger = get_logger(__name__)


@dataclass
class TensorParallelGroup:
    """This process's place among the ranks of one model (rank 0 samples)."""
    rank: int = 0
    world_size: int = 1

    @classmethod
    def single(cls) -> "TensorParallelGroup":
        return cls(0, 1)

    @property
    def is_first(self) -> bool:
        return self.rank == 0

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """The element-wise sum of `x` over the ranks, in place; every rank gets the same."""
        if self.world_size > 1:
            dist.all_reduce(x)
        return x

    def gather_to_first(self, x: torch.Tensor) -> torch.Tensor | None:
        """Rank 0: the ranks' `x` concatenated along the last dimension, in rank order;
        other ranks: None (they only send)."""
        if self.world_size == 1:
            return x
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(self.world_size)] if self.is_first else None
        dist.gather(x, parts, dst=0)
        return torch.cat(parts, dim=-1) if parts is not None else None


def init_tensor_parallel(rank: int, world_size: int, backend: str, init_method: str,
                         timeout_s: float) -> TensorParallelGroup:
    """Join the process group of the model's ranks (a no-op for one rank).

    `init_method` is a ``tcp://host:port`` rendezvous all ranks share. Collectives
    give up after `timeout_s`, so a dead peer turns into an error instead of a hang."""
    if world_size > 1:
        dist.init_process_group(backend, init_method=init_method, rank=rank,
                                world_size=world_size,
                                timeout=datetime.timedelta(seconds=timeout_s))
        logger.info("rank %d of %d joined the %s process group", rank, world_size, backend)
    return TensorParallelGroup(rank, world_size)


def close_tensor_parallel() -> None:
    """Leave the process group, if this process joined one."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
