"""The `example` platform: the host CPU, through heron's public platform API only."""
from __future__ import annotations

import os
from typing import TYPE_CHECKING

from heron.platforms import Capabilities, Detection, MemoryInfo, MemoryProfile, Platform
from heron.platforms.probes import host_memory_info

if TYPE_CHECKING:
    import torch

    from heron.config import EngineConfig
    from heron.kernels.interface import AttentionBackend


class ExamplePlatform(Platform):
    """Runs models on the host CPU with the reference attention backend.

    A real backend would probe its device in `detect()`, return its own kernels from
    `attention_backend()` and read its device's memory in `memory_info()`.
    """

    name = "example"
    device_type = "cpu"
    # Below the built-in cpu platform (0): installing this package must not change
    # what device="auto" picks.
    priority = -10
    # Only what this platform has been checked to do (`python -m
    # heron.testing.conformance --device example` verifies every claim).
    capabilities = Capabilities(dtypes=frozenset({"float32", "bfloat16"}),
                                prefix_caching=True, chunked_prefill=True)
    # A cap on the KV cache: host memory is shared with everything else on the machine.
    max_kv_cache_bytes = 512 * 2**20

    def detect(self) -> Detection:
        # Cheap and never raising: no torch import, nothing that can fail.
        cores = os.cpu_count() or 0
        if cores < 1:
            return Detection(False, "no CPU cores visible to this process")
        return Detection(True, f"host CPU, {cores} cores (example platform)")

    def attention_backend(self, dtype: "torch.dtype", head_size: int) -> type["AttentionBackend"]:
        # Looked up by name: heron's reference backend, or one a kernel plugin registered.
        from heron.kernels.registry import AttentionBackendRegistry
        return AttentionBackendRegistry.get("reference")

    def memory_info(self) -> MemoryInfo:
        return host_memory_info()

    def executor_class(self) -> type:
        """Its own executor (one rank in the engine's process; `tensor_parallel` stays
        False). Returning None, the default, lets heron choose."""
        from heron_platform_example.executor import ExampleExecutor
        return ExampleExecutor

    def kv_cache_bytes(self, config: "EngineConfig", profile: MemoryProfile) -> int:
        """heron's measured budget (a share of memory less weights and peak activations),
        capped; an explicit kv_cache_memory_bytes still wins."""
        budget = super().kv_cache_bytes(config, profile)
        if config.cache.kv_cache_memory_bytes is not None:
            return budget
        return min(budget, self.max_kv_cache_bytes)
