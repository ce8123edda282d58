"""The cpu platform: PyTorch on the host CPU, with heron's C attention kernel."""
from __future__ import annotations

import os
from typing import TYPE_CHECKING

from heron import envs
from heron.platforms.interface import Capabilities, Detection, MemoryInfo, MemoryProfile, Platform

if TYPE_CHECKING:
    import torch

    from heron.config import EngineConfig
    from heron.kernels.interface import AttentionBackend


def _meminfo() -> dict[str, int]:
    values = {}
    with open("/proc/meminfo") as f:
        for line in f:
            key, rest = line.split(":", 1)
            values[key] = int(rest.split()[0]) * 1024
    return values


class CpuPlatform(Platform):
    name = "cpu"
    device_type = "cpu"
    priority = 0  # any accelerator that is present wins over the host CPU
    capabilities = Capabilities(dtypes=frozenset({"float32", "bfloat16", "float16"}),
                                prefix_caching=True, chunked_prefill=True)

    def detect(self) -> Detection:
        return Detection(True, f"{os.cpu_count()} CPU cores")

    def attention_backend(self, dtype: "torch.dtype", head_size: int) -> type["AttentionBackend"]:
        if envs.get("HERON_CPU_ATTENTION") == "reference":
            from heron.kernels.reference import ReferenceAttention
            return ReferenceAttention
        from heron.kernels.cpu import CpuAttention
        return CpuAttention

    def memory_info(self) -> MemoryInfo:
        try:
            info = _meminfo()
            return MemoryInfo(info["MemTotal"], info.get("MemAvailable", info["MemFree"]))
        except (OSError, KeyError, ValueError):
            return MemoryInfo(0, 0)

    def kv_cache_bytes(self, config: "EngineConfig", profile: MemoryProfile) -> int:
        """Fixed space, like vLLM's CPU backend: HERON_CPU_KVCACHE_SPACE GiB (default 4),
        unless kv_cache_memory_bytes is given."""
        if config.cache.kv_cache_memory_bytes is not None:
            return config.cache.kv_cache_memory_bytes
        space = float(envs.get("HERON_CPU_KVCACHE_SPACE") or 4)
        return int(space * 2**30)

    def set_up_process(self) -> None:
        import torch
        threads = envs.get("HERON_CPU_NUM_THREADS")
        if threads:
            torch.set_num_threads(int(threads))
