"""Executors run the model runner(s) for the engine; the platform chooses which.

`UniProcExecutor` runs one model runner in the engine's own process. Executors for
tensor parallelism (several processes, or Ray) implement the same four methods.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING

from heron.config import EngineConfig
from heron.core.scheduler import ModelRunnerOutput, SchedulerOutput
from heron.logger import get_logger
from heron.platforms.interface import MemoryProfile, Platform

if TYPE_CHECKING:
    from heron.worker.model_runner import ModelRunner

logger = get_logger(__name__)


class Executor(ABC):
    def __init__(self, config: EngineConfig, platform: Platform, model_path: str) -> None:
        self.config = platform.complete_config(config)
        self.platform = platform
        self.model_path = model_path

    @property
    @abstractmethod
    def model_max_len(self) -> int:
        """The longest context the model was trained for."""

    @abstractmethod
    def determine_num_blocks(self) -> int:
        """How many KV blocks fit, from the platform's memory profile or the override."""

    @abstractmethod
    def initialize_cache(self, num_blocks: int) -> None:
        """Allocate the KV cache."""

    @abstractmethod
    def execute_model(self, sched: SchedulerOutput) -> ModelRunnerOutput:
        """Run one scheduled step."""


class UniProcExecutor(Executor):
    def __init__(self, config: EngineConfig, platform: Platform, model_path: str) -> None:
        super().__init__(config, platform, model_path)
        platform.set_up_process()
        platform.seed_everything(config.model.seed)
        self.runner = self.make_runner()

    def make_runner(self) -> "ModelRunner":
        """The model runner this executor drives; a platform whose models do not run in torch
        subclasses the executor and returns its own (same methods as `ModelRunner`)."""
        from heron.worker.model_runner import ModelRunner  # torch stays out of detection paths
        return ModelRunner(self.config, self.platform, self.model_path)

    @property
    def model_max_len(self) -> int:
        return self.runner.model_max_len

    @property
    def vocab_size(self) -> int:
        return self.runner.vocab_size

    def determine_num_blocks(self) -> int:
        override = self.config.cache.num_gpu_blocks_override
        before = self.platform.memory_info()
        seconds = self.runner.profile_run(self.config.scheduler.max_num_batched_tokens)
        after = self.platform.memory_info()
        profile = MemoryProfile(
            weights_bytes=self.runner.weights_bytes(),
            peak_activation_bytes=max(0, before.available_bytes - after.available_bytes),
            memory=after)
        logger.info("profile run: %.2f s, weights %.1f MiB", seconds, profile.weights_bytes / 2**20)
        if override is not None:
            return override
        num_blocks = self.platform.kv_cache_bytes(self.config, profile) // self.runner.kv_block_bytes()
        if num_blocks < 1:
            raise RuntimeError(
                f"no memory left for the KV cache on {self.platform.name}: weights take "
                f"{profile.weights_bytes / 2**30:.2f} GiB; pass kv_cache_memory_bytes=... or a "
                "smaller model")
        return int(num_blocks)

    def initialize_cache(self, num_blocks: int) -> None:
        self.runner.initialize_cache(num_blocks)

    def execute_model(self, sched: SchedulerOutput) -> ModelRunnerOutput:
        return self.runner.execute_model(sched)
