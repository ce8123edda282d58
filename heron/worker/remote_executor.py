"""What executors whose ranks run elsewhere (spawned processes, Ray actors) share.

Rank 0's facts about the model, the smallest KV-block count over the ranks, each step
encoded and pickled once for every rank, and a failure that sticks: after a rank fails,
every rank is stopped and every later call raises the same `WorkerError`. Subclasses
start the ranks, then set `_facts` and `_finalizer` (which stops them), and implement
`_call` (a method on every rank) and `_run_step` (one pickled step on every rank).
"""
from __future__ import annotations

import pickle
import time
from abc import abstractmethod
from dataclasses import dataclass
from typing import Any, Callable

from heron import envs
from heron.config import EngineConfig
from heron.core.scheduler import ModelRunnerOutput, SchedulerOutput
from heron.distributed import CollectiveStats
from heron.logger import get_logger
from heron.platforms.interface import Platform
from heron.worker.executor import Executor, WorkerError
from heron.worker.step_message import StepEncoder
from heron.worker.worker import ModelFacts

logger = get_logger(__name__)


def worker_timeout() -> float:
    """HERON_WORKER_TIMEOUT_SECONDS: how long a rank may take to answer one call."""
    return float(envs.get("HERON_WORKER_TIMEOUT_SECONDS") or 300)


@dataclass
class StepTransferStats:
    """Steps sent to the ranks: how many, their pickled bytes, and the seconds spent
    encoding, pickling and handing them over (diagnostics for benchmarks)."""
    steps: int = 0
    bytes: int = 0
    seconds: float = 0.0

    def record(self, nbytes: int, since: float) -> None:
        self.steps += 1
        self.bytes += nbytes
        self.seconds += time.perf_counter() - since


class RemoteRanksExecutor(Executor):
    """Base of `MultiprocExecutor` and `RayExecutor`."""

    def __init__(self, config: EngineConfig, platform: Platform, model_path: str) -> None:
        super().__init__(config, platform, model_path)
        self._timeout = worker_timeout()
        self._error: WorkerError | None = None
        self._encoder = StepEncoder()
        self._facts: ModelFacts | None = None
        self._finalizer: Callable[[], Any] = lambda: None
        self.transfer = StepTransferStats()

    @property
    def model_max_len(self) -> int:
        assert self._facts is not None
        return self._facts.model_max_len

    @property
    def vocab_size(self) -> int:
        assert self._facts is not None
        return self._facts.vocab_size

    def determine_num_blocks(self) -> int:
        counts = self._call("determine_num_blocks")
        if len(set(counts)) > 1:
            logger.info("KV blocks per rank %s: using the smallest", counts)
        return min(counts)

    def initialize_cache(self, num_blocks: int) -> None:
        self._call("initialize_cache", num_blocks)

    def execute_model(self, sched: SchedulerOutput) -> ModelRunnerOutput:
        self._raise_if_failed()
        start = time.perf_counter()
        payload = pickle.dumps(self._encoder.encode(sched), protocol=pickle.HIGHEST_PROTOCOL)
        return self._run_step(payload, start)

    def collective_stats(self) -> list[CollectiveStats]:
        """Each rank's collectives so far, in rank order (diagnostics for benchmarks)."""
        return self._call("collective_stats")

    @abstractmethod
    def _call(self, method: str, *args: Any, timeout: float | None = -1.0) -> list[Any]:
        """Run the worker's `method(*args)` on every rank; results in rank order. A
        `timeout` of -1 means the worker timeout, None no limit."""

    @abstractmethod
    def _run_step(self, payload: bytes, since: float) -> ModelRunnerOutput:
        """Hand the pickled `StepMessage` to every rank (recording the transfer in
        `self.transfer` from `since`), and return rank 0's output."""

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            raise self._error

    def _fail(self, error: WorkerError) -> None:
        """Every rank goes; this and every later call raise `error`."""
        if self._error is None:
            logger.error("%s; stopping every rank", error)
            self._error = error
            self._encoder.forget()
            self._finalizer()
        raise self._error
