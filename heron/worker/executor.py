"""Executors: the engine's one handle on the model, however many processes run it.

The engine calls an executor in this order, from one thread (the engine's):

1. the constructor: start the ranks and load the model (blocks until loaded);
2. `model_max_len`, `vocab_size`: facts about the model;
3. `determine_num_blocks()`: profile memory on every rank; the smallest count wins;
4. `initialize_cache(num_blocks)`: allocate every rank's KV cache;
5. `execute_model(sched)` once per step: the sampled tokens, from rank 0;
6. `shutdown()`: stop every rank; safe to call twice.

`check_health()` may be called from any thread. Any failure of a rank (an exception,
a dead process, no reply in time) raises `WorkerError` naming the rank, from that call
and every later one: the engine then fails the requests in flight.

heron's executors: `UniProcExecutor` (one rank in the engine's process),
`MultiprocExecutor` (one process per rank on this host) and `RayExecutor` (Ray actors,
over the nodes of a Ray cluster), chosen by `distributed_executor_backend`. A platform
supplies its own by subclassing `Executor` and returning the class from
`Platform.executor_class()`.
"""
from __future__ import annotations

from abc import ABC, abstractmethod

from heron.config import EngineConfig
from heron.core.scheduler import ModelRunnerOutput, SchedulerOutput
from heron.platforms.interface import Platform


class WorkerError(RuntimeError):
    """A rank failed: it raised, its process died, or it did not answer in time."""

    def __init__(self, rank: int | None, message: str) -> None:
        where = f"worker rank {rank}" if rank is not None else "a worker"
        super().__init__(f"{where}: {message}")
        self.rank = rank


class Executor(ABC):
    """Runs the model runner(s) of one model for the engine (the contract above)."""

    def __init__(self, config: EngineConfig, platform: Platform, model_path: str) -> None:
        self.config = platform.complete_config(config)
        self.platform = platform
        self.model_path = model_path

    @property
    @abstractmethod
    def model_max_len(self) -> int:
        """The longest context the model was trained for."""

    @property
    @abstractmethod
    def vocab_size(self) -> int:
        """Rows of the model's logits (token ids are below it)."""

    @abstractmethod
    def determine_num_blocks(self) -> int:
        """How many KV blocks fit on every rank, from the platform's memory profile or
        `num_gpu_blocks_override`."""

    @abstractmethod
    def initialize_cache(self, num_blocks: int) -> None:
        """Allocate `num_blocks` KV blocks on every rank."""

    @abstractmethod
    def execute_model(self, sched: SchedulerOutput) -> ModelRunnerOutput:
        """Run one scheduled step on every rank; rank 0's sampled tokens."""

    def check_health(self) -> None:
        """Raise `WorkerError` if a rank is known to be gone; cheap, any thread."""

    def shutdown(self) -> None:
        """Stop every rank and free what they hold; later calls do nothing."""


class UniProcExecutor(Executor):
    """One rank in the engine's own process: steps go to the runner without copies."""

    def __init__(self, config: EngineConfig, platform: Platform, model_path: str) -> None:
        super().__init__(config, platform, model_path)
        from heron.worker.worker import Worker  # torch stays out of detection paths
        self.worker = Worker(self.config, platform, model_path)
        self.runner = self.worker.runner

    @property
    def model_max_len(self) -> int:
        return int(self.runner.model_max_len)

    @property
    def vocab_size(self) -> int:
        return int(self.runner.vocab_size)

    def determine_num_blocks(self) -> int:
        return self.worker.determine_num_blocks()

    def initialize_cache(self, num_blocks: int) -> None:
        self.worker.initialize_cache(num_blocks)

    def execute_model(self, sched: SchedulerOutput) -> ModelRunnerOutput:
        return self.runner.execute_model(sched)   # the only rank: straight to its runner


def executor_class(config: EngineConfig, platform: Platform) -> type[Executor]:
    """The executor for `config` on `platform`: the platform's own if it has one, else
    heron's for `distributed_executor_backend`."""
    own = platform.executor_class()
    if own is not None:
        if not (isinstance(own, type) and issubclass(own, Executor)):
            raise TypeError(f"platform {platform.name!r}: executor_class() returned {own!r}, "
                            "not a subclass of heron.worker.executor.Executor")
        return own
    backend = config.parallel.executor_backend
    if backend == "mp":
        from heron.worker.mp_executor import MultiprocExecutor
        return MultiprocExecutor
    if backend == "ray":
        from heron.worker.ray_executor import RayExecutor
        return RayExecutor
    return UniProcExecutor
