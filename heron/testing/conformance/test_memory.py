"""A sane memory profile: what the platform reports, and the KV blocks it leads to."""
from __future__ import annotations

from typing import Any, Callable

from heron.config import EngineConfig
from heron.platforms.interface import MemoryInfo, Platform
from heron.worker.executor import executor_class


def test_memory_info_is_sane(platform: Platform) -> None:
    info = platform.memory_info()
    assert isinstance(info, MemoryInfo)
    assert isinstance(info.total_bytes, int) and isinstance(info.available_bytes, int)
    assert info.total_bytes > 0, "total memory unknown"
    assert info.total_bytes >= info.available_bytes >= 0


def test_own_estimate_gives_kv_blocks(platform: Platform, pinned_device: str,
                                      tiny_models: Any) -> None:
    """The profile run plus the platform's own budget (no explicit size) leave room for
    KV blocks. Measured without allocating the cache, which may be large."""
    config = EngineConfig.create(model=str(tiny_models["llama"]), dtype="float32",
                                 device=pinned_device)
    executor = executor_class(config, platform)(config, platform, str(tiny_models["llama"]))
    try:
        num_blocks = executor.determine_num_blocks()
    finally:
        executor.shutdown()
    assert isinstance(num_blocks, int) and num_blocks > 0


def test_explicit_kv_cache_bytes_are_honoured(make_llm: Callable[..., Any]) -> None:
    budget = 4 * 2**20
    small = make_llm(kv_cache_memory_bytes=budget).llm_engine.num_blocks
    large = make_llm(kv_cache_memory_bytes=2 * budget).llm_engine.num_blocks
    assert small > 0
    assert abs(large - 2 * small) <= 1, f"{budget} B gave {small} blocks, twice that {large}"
