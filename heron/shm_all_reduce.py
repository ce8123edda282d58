"""All-reduce through shared memory, for tensor-parallel ranks on one host.

gloo sums host tensors over loopback TCP, about a millisecond per call on the 2-core
machines measured here, and a tensor-parallel model makes two calls per layer per step.
Ranks on one host can instead meet in a shared mapping: each copies its tensor into its
own slot, publishes a sequence number, waits until every rank has published the same
one, and sums all slots in rank order (so every rank computes bit-identical sums).

Two sets of slots alternate by the parity of the sequence number. A rank writes the
set of call s only after it saw every rank reach call s - 1, which each rank does only
after it finished reading call s - 2 from that same set: one wait per call is enough.
A rank that does not arrive within the collective timeout turns into an error, not a
hang. Tensors too large for a slot go through gloo.
"""
from __future__ import annotations

import mmap
import os
import tempfile
import time

import numpy as np
import torch
import torch.distributed as dist

# A slot holds a prefill step's activations for models up to ~4k hidden size in bf16
# (2048 tokens x 4096 x 2 bytes); pages are only touched as far as tensors reach.
SLOT_BYTES = 16 * 2**20
_FLAG_STRIDE = 8          # int64s between two ranks' sequence numbers: one cache line each
_SPINS_BEFORE_YIELD = 64
_SPINS_PER_CLOCK_CHECK = 4096


class SharedMemoryAllReduce:
    """One rank's handle on the shared mapping (create it on every rank, collectively)."""

    def __init__(self, rank: int, world_size: int, path: str, timeout_s: float,
                 slot_bytes: int = SLOT_BYTES) -> None:
        self.rank = rank
        self.world_size = world_size
        self.timeout_s = timeout_s
        self.slot_bytes = slot_bytes
        flag_bytes = world_size * _FLAG_STRIDE * 8
        size = flag_bytes + 2 * world_size * slot_bytes
        with open(path, "r+b") as f:
            self._map = mmap.mmap(f.fileno(), size)
        self._flags = np.frombuffer(self._map, dtype=np.int64, count=world_size * _FLAG_STRIDE)
        raw = torch.frombuffer(self._map, dtype=torch.uint8, offset=flag_bytes,
                               count=2 * world_size * slot_bytes)
        self._slots = raw.view(2, world_size, slot_bytes)
        self._seq = 0
        # (parity, dtype, shape) -> every rank's slot viewed as such a tensor: making the
        # views costs more than the copy and the sum of a decode step's activations, and
        # a step repeats one shape across all its layers.
        self._views: dict[tuple[int, torch.dtype, torch.Size], list[torch.Tensor]] = {}

    @classmethod
    def create(cls, rank: int, world_size: int, timeout_s: float) -> "SharedMemoryAllReduce":
        """Rank 0 makes the file, every rank maps it, then the name is removed: the mapping
        outlives it, and nothing is left behind however the processes end."""
        path = None
        if rank == 0:
            fd, path = tempfile.mkstemp(prefix="heron-allreduce-",
                                        dir="/dev/shm" if os.path.isdir("/dev/shm") else None)
            os.ftruncate(fd, world_size * _FLAG_STRIDE * 8 + 2 * world_size * SLOT_BYTES)
            os.close(fd)
        names = [path]
        dist.broadcast_object_list(names, src=0)
        handle = cls(rank, world_size, names[0], timeout_s)
        dist.barrier()
        if rank == 0:
            os.unlink(names[0])
        return handle

    def fits(self, x: torch.Tensor) -> bool:
        return (x.device.type == "cpu" and x.is_contiguous()
                and x.numel() * x.element_size() <= self.slot_bytes)

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum `x` over the ranks, in place (the same bits on every rank)."""
        self._seq += 1
        slots = self._slot_views(self._seq & 1, x)
        slots[self.rank].copy_(x)
        self._flags[self.rank * _FLAG_STRIDE] = self._seq   # after the data: x86 keeps the order
        self._wait_for_all()
        x.copy_(slots[0])
        for slot in slots[1:]:
            x.add_(slot)
        return x

    def _slot_views(self, parity: int, x: torch.Tensor) -> list[torch.Tensor]:
        key = (parity, x.dtype, x.shape)
        views = self._views.get(key)
        if views is None:
            if len(self._views) > 256:   # prefill chunks vary in length: keep it bounded
                self._views.clear()
            nbytes = x.numel() * x.element_size()
            views = [self._slots[parity, r, :nbytes].view(x.dtype).view(x.shape)
                     for r in range(self.world_size)]
            self._views[key] = views
        return views

    def _wait_for_all(self) -> None:
        seq, flags = self._seq, self._flags
        for r in range(self.world_size):
            spins = 0
            deadline = 0.0
            while flags[r * _FLAG_STRIDE] < seq:
                spins += 1
                if spins > _SPINS_BEFORE_YIELD:
                    os.sched_yield()   # let a rank that shares this core arrive
                if spins % _SPINS_PER_CLOCK_CHECK == 0:
                    now = time.monotonic()
                    deadline = deadline or now + self.timeout_s
                    if now > deadline:
                        raise RuntimeError(f"all-reduce: rank {r} did not arrive within "
                                           f"{self.timeout_s:.0f} s (HERON_WORKER_TIMEOUT_SECONDS)")

    def close(self) -> None:
        self._views.clear()
        del self._flags, self._slots
        try:
            self._map.close()
        except BufferError:   # a tensor view still points into it; the OS frees it at exit
            pass
