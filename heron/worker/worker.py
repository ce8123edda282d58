"""One rank of a model: its process set up, its shard loaded, its KV cache, its steps.

Every executor drives `Worker`s: the in-process executor one in the engine's process,
the multiprocess and Ray executors one per rank in processes of their own. The worker
is where the platform contract is used on the model side: `set_up_process`, the
platform's own model runner (or heron's torch `ModelRunner`), and the memory profile
that sizes this rank's share of the KV cache.
"""
from __future__ import annotations

import pickle
from dataclasses import dataclass
from typing import Any

from heron.config import EngineConfig
from heron.core.scheduler import ModelRunnerOutput, SchedulerOutput
from heron.distributed import CollectiveStats, close_tensor_parallel, init_tensor_parallel
from heron.logger import get_logger
from heron.platforms.interface import MemoryProfile, Platform, RankPlacement
from heron.worker.step_message import RequestMirrors, StepMessage

logger = get_logger(__name__)


@dataclass
class WorkerSpec:
    """Everything a worker process needs to build its `Worker` (picklable: it travels to
    spawned processes and Ray actors)."""
    config: EngineConfig
    platform: Platform
    model_path: str
    placement: RankPlacement
    init_method: str
    timeout_s: float

    def build(self) -> "Worker":
        """Load the plugins' models and kernels into this fresh process, then the worker."""
        from heron.platforms.registry import load_extensions
        load_extensions()
        return Worker(self.config, self.platform, self.model_path, self.placement,
                      self.init_method, self.timeout_s)


# What an executor may ask of a worker in another process, by name.
REMOTE_METHODS = frozenset({"model_facts", "determine_num_blocks", "initialize_cache",
                            "execute_pickled_step", "collective_stats", "shutdown"})


@dataclass(frozen=True)
class ModelFacts:
    """What the engine needs to know about the loaded model (from rank 0)."""
    model_max_len: int
    vocab_size: int


class Worker:
    """One rank. `init_method` is the process-group rendezvous (unused for one rank)."""

    def __init__(self, config: EngineConfig, platform: Platform, model_path: str,
                 placement: RankPlacement | None = None, init_method: str = "",
                 timeout_s: float = 300.0) -> None:
        self.config = config
        self.platform = platform
        self.placement = placement or RankPlacement()
        platform.set_up_process(self.placement)
        platform.seed_everything(config.model.seed)
        self.group = init_tensor_parallel(self.placement.rank, self.placement.world_size,
                                          platform.distributed_backend, init_method, timeout_s)
        self.runner: Any = platform.make_model_runner(config, model_path, self.group)
        if self.runner is None:
            from heron.worker.model_runner import ModelRunner  # torch stays out of detection
            self.runner = ModelRunner(config, platform, model_path, self.group)
        self._mirrors = RequestMirrors()

    @property
    def rank(self) -> int:
        return self.placement.rank

    def model_facts(self) -> ModelFacts:
        return ModelFacts(self.runner.model_max_len, self.runner.vocab_size)

    def determine_num_blocks(self) -> int:
        """KV blocks this rank's memory holds: the platform's budget after a profiled dummy
        forward pass, over the bytes of one block of this rank's shard."""
        before = self.platform.memory_info()
        seconds = self.runner.profile_run(self.config.scheduler.max_num_batched_tokens)
        after = self.platform.memory_info()
        profile = MemoryProfile(
            weights_bytes=self.runner.weights_bytes(),
            peak_activation_bytes=max(0, before.available_bytes - after.available_bytes),
            memory=after)
        logger.info("rank %d profile run: %.2f s, weights %.1f MiB", self.rank, seconds,
                    profile.weights_bytes / 2**20)
        override = self.config.cache.num_gpu_blocks_override
        if override is not None:
            return override
        num_blocks = self.platform.kv_cache_bytes(self.config, profile) // self.runner.kv_block_bytes()
        if num_blocks < 1:
            raise RuntimeError(
                f"no memory left for the KV cache on {self.platform.name} (rank {self.rank}): "
                f"weights take {profile.weights_bytes / 2**30:.2f} GiB; pass "
                "kv_cache_memory_bytes=... or a smaller model")
        return int(num_blocks)

    def initialize_cache(self, num_blocks: int) -> None:
        self.runner.initialize_cache(num_blocks)

    def execute_model(self, sched: SchedulerOutput) -> ModelRunnerOutput | None:
        """Run one step; rank 0 returns the sampled tokens, other ranks None."""
        output = self.runner.execute_model(sched)
        return output if self.rank == 0 else None

    def execute_step(self, message: StepMessage) -> ModelRunnerOutput | None:
        """`execute_model` for a step sent from the engine's process."""
        return self.execute_model(self._mirrors.decode(message))

    def execute_pickled_step(self, payload: bytes) -> ModelRunnerOutput | None:
        """`execute_step` for a pickled `StepMessage` (the same bytes go to every rank)."""
        return self.execute_step(pickle.loads(payload))

    def collective_stats(self) -> CollectiveStats:
        """Collectives this rank ran so far and the time they took (diagnostics)."""
        return self.group.stats

    def shutdown(self) -> None:
        close_tensor_parallel(self.group)
