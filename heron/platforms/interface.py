"""The Platform contract: what a hardware plugin gives the hardware-neutral core.

A plugin subclasses `Platform` once and registers an instance through the
`register_platforms` hook. The core never asks a platform "do you support X?"
through ad-hoc methods: it reads the frozen `Capabilities`, asks `validate()`
for reasons to refuse a configuration, and otherwise calls the handful of
members below.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar

if TYPE_CHECKING:  # heavy imports stay out of detection
    import torch

    from heron.config import EngineConfig
    from heron.kernels.interface import AttentionBackend
    from heron.worker.executor import Executor


@dataclass(frozen=True)
class Detection:
    """Whether a platform can run here, and why (or why not), in words a user can act on."""
    available: bool
    reason: str


@dataclass(frozen=True)
class Capabilities:
    """What a platform can do, declared once; the conformance suite checks it against behaviour."""
    dtypes: frozenset[str] = frozenset({"float32"})
    kv_cache_dtypes: frozenset[str] = frozenset({"auto"})
    prefix_caching: bool = True
    chunked_prefill: bool = True
    tensor_parallel: bool = False
    graph_capture: bool = False


@dataclass(frozen=True)
class MemoryInfo:
    """Device memory in bytes: all of it, and what is free now."""
    total_bytes: int
    available_bytes: int


@dataclass(frozen=True)
class MemoryProfile:
    """What a dummy forward pass measured: weights plus peak activations, in bytes."""
    weights_bytes: int
    peak_activation_bytes: int
    memory: MemoryInfo = field(default_factory=lambda: MemoryInfo(0, 0))


class Platform(ABC):
    """One kind of hardware. Subclasses set the class attributes and implement detect()."""

    name: ClassVar[str]                 # what users pass as device=
    device_type: ClassVar[str]          # the torch device type models run on ("cpu", "cuda", ...)
    priority: ClassVar[int] = 0         # device="auto" picks the available platform with the highest
    capabilities: ClassVar[Capabilities] = Capabilities()
    distributed_backend: ClassVar[str] = "gloo"

    @abstractmethod
    def detect(self) -> Detection:
        """Cheap: import nothing heavy, probe the device, never raise."""

    def validate(self, config: "EngineConfig") -> list[str]:
        """Reasons this platform cannot run `config` (empty when it can). Never mutates config."""
        reasons = []
        dtype = config.model.dtype
        if dtype != "auto" and dtype not in self.capabilities.dtypes:
            reasons.append(f"dtype {dtype} is not supported on {self.name} "
                           f"(supported: {', '.join(sorted(self.capabilities.dtypes))})")
        if config.cache.enable_prefix_caching and not self.capabilities.prefix_caching:
            reasons.append(f"{self.name} has no prefix caching; pass enable_prefix_caching=False")
        return reasons

    def torch_device(self) -> "torch.device":
        import torch
        return torch.device(self.device_type)

    @abstractmethod
    def attention_backend(self, dtype: "torch.dtype", head_size: int) -> type["AttentionBackend"]:
        """The attention backend class for this dtype and head size."""

    @abstractmethod
    def memory_info(self) -> MemoryInfo:
        """Total and currently available device memory."""

    def kv_cache_bytes(self, config: "EngineConfig", profile: MemoryProfile) -> int:
        """Bytes the KV cache may take. An explicit `kv_cache_memory_bytes` always wins;
        otherwise a share (`gpu_memory_utilization`) of total memory, less weights and
        peak activations."""
        if config.cache.kv_cache_memory_bytes is not None:
            return config.cache.kv_cache_memory_bytes
        budget = profile.memory.total_bytes * config.cache.gpu_memory_utilization
        return int(budget - profile.weights_bytes - profile.peak_activation_bytes)

    def executor_class(self) -> type["Executor"]:
        """The executor that runs the model runner(s) for this platform."""
        from heron.worker.executor import UniProcExecutor
        return UniProcExecutor

    def set_up_process(self) -> None:
        """Called once in each worker process before the model loads (threads, env)."""

    def seed_everything(self, seed: int) -> None:
        import random

        import torch
        random.seed(seed)
        torch.manual_seed(seed)
