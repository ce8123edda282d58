"""The tensor-parallel group of one worker process, and the collectives a sharded model needs.

Every rank of a tensor-parallel model runs the same step on its shard of the weights;
their partial results meet in two collectives: `all_reduce` (the sum of the row-parallel
projections and of the vocabulary-parallel embedding) and `gather_to_first` (the
vocabulary shards of the logits, needed only by rank 0, which samples). One rank, the
common case, is `TensorParallelGroup.single()`: both are then the identity, and no
torch.distributed state exists at all.

Ranks on one host whose tensors live in host memory (the gloo backend) sum through
shared memory (`heron.shm_all_reduce`) instead of gloo's loopback TCP: an all-reduce of
a decode step's activations takes about a millisecond through gloo here, and a model
does two per layer.
"""
from __future__ import annotations

import datetime
import socket
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

from heron import envs
from heron.logger import get_logger

if TYPE_CHECKING:
    from heron.shm_all_reduce import SharedMemoryAllReduce

logger = get_logger(__name__)


@dataclass
class CollectiveStats:
    """Collectives this rank ran and the seconds it spent in them (waiting for slower
    ranks included): what tensor parallelism costs on top of the shards' compute."""
    calls: int = 0
    seconds: float = 0.0


@dataclass
class TensorParallelGroup:
    """This process's place among the ranks of one model (rank 0 samples)."""
    rank: int = 0
    world_size: int = 1
    shared_memory: "SharedMemoryAllReduce | None" = None
    stats: CollectiveStats = field(default_factory=CollectiveStats)

    @classmethod
    def single(cls) -> "TensorParallelGroup":
        return cls(0, 1)

    @property
    def is_first(self) -> bool:
        return self.rank == 0

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """The element-wise sum of `x` over the ranks, in place; every rank gets the same."""
        if self.world_size > 1:
            start = time.perf_counter()
            if self.shared_memory is not None and self.shared_memory.fits(x):
                self.shared_memory.all_reduce(x)
            else:
                dist.all_reduce(x)
            self._count(start)
        return x

    def _count(self, start: float) -> None:
        self.stats.calls += 1
        self.stats.seconds += time.perf_counter() - start

    def gather_to_first(self, x: torch.Tensor) -> torch.Tensor | None:
        """Rank 0: the ranks' `x` concatenated along the last dimension, in rank order;
        other ranks: None (they only send)."""
        if self.world_size == 1:
            return x
        start = time.perf_counter()
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(self.world_size)] if self.is_first else None
        dist.gather(x, parts, dst=0)
        self._count(start)
        return torch.cat(parts, dim=-1) if parts is not None else None


def init_tensor_parallel(rank: int, world_size: int, backend: str, init_method: str,
                         timeout_s: float) -> TensorParallelGroup:
    """Join the process group of the model's ranks (a no-op for one rank).

    `init_method` is a ``tcp://host:port`` rendezvous all ranks share. Collectives
    give up after `timeout_s`, so a dead peer turns into an error instead of a hang."""
    if world_size == 1:
        return TensorParallelGroup()
    dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=timeout_s))
    shared = None
    if backend == "gloo" and envs.get("HERON_SHM_ALL_REDUCE") != "0" and _all_on_one_host():
        from heron.shm_all_reduce import SharedMemoryAllReduce
        shared = SharedMemoryAllReduce.create(rank, world_size, timeout_s)
    logger.info("rank %d of %d joined the %s process group%s", rank, world_size, backend,
                " (all-reduce through shared memory)" if shared else "")
    return TensorParallelGroup(rank, world_size, shared)


def _all_on_one_host() -> bool:
    """Whether every rank runs on this host (they then share memory)."""
    hosts: list[str | None] = [None] * dist.get_world_size()
    dist.all_gather_object(hosts, _host_id())
    return len(set(hosts)) == 1


def _host_id() -> str:
    try:   # a container's hostname can repeat across hosts; the boot id does not
        with open("/proc/sys/kernel/random/boot_id", encoding="ascii") as f:
            return f"{socket.gethostname()}/{f.read().strip()}"
    except OSError:
        return socket.gethostname()


def close_tensor_parallel(group: TensorParallelGroup | None = None) -> None:
    """Leave the process group, if this process joined one, and free shared memory."""
    if group is not None and group.shared_memory is not None:
        group.shared_memory.close()
        group.shared_memory = None
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
