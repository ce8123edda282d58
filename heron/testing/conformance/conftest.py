"""Fixtures of the conformance suite: the platform under test, tiny models, engines.

Every engine the suite builds runs on the platform under test and nowhere else:
HERON_DEVICE is pinned to it for the session, and each engine's platform is
checked by name after construction.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

from heron.platforms.plugins import PlatformEntry, make_plugin_manager
from heron.platforms.registry import PlatformError, choose_platform
from heron.testing.conformance.models import build_tiny_model
from heron.testing.conformance.plugin import requested_device

# Small explicit KV budgets keep every engine cheap; the memory tests cover the
# platform's own estimate separately.
KV_BYTES = 16 * 2**20


def pytest_report_header(config: pytest.Config) -> str:
    return f"heron conformance: device={requested_device(config)}"


@pytest.fixture(scope="session")
def device_name(pytestconfig: pytest.Config) -> str:
    """The device the suite was asked to check, as given (may be "auto")."""
    return requested_device(pytestconfig)


@pytest.fixture(scope="session")
def platform_entry(device_name: str) -> PlatformEntry:
    """The resolved platform (with its plugin and detection); fails when unavailable."""
    try:
        return choose_platform(make_plugin_manager(), device_name)
    except PlatformError as e:
        error = str(e)
    pytest.fail(f"cannot check device {device_name!r}: {error}", pytrace=False)


@pytest.fixture(scope="session")
def platform(platform_entry: PlatformEntry) -> Any:
    return platform_entry.platform


@pytest.fixture(scope="session")
def pinned_device(platform: Any) -> Iterator[str]:
    """HERON_DEVICE set to the platform under test for the rest of the session."""
    previous = os.environ.get("HERON_DEVICE")
    os.environ["HERON_DEVICE"] = platform.name
    yield platform.name
    if previous is None:
        os.environ.pop("HERON_DEVICE", None)
    else:
        os.environ["HERON_DEVICE"] = previous


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One tiny random model folder per family ("llama", "qwen2")."""
    root = tmp_path_factory.mktemp("heron-conformance-models")
    return {family: build_tiny_model(root / family, family, seed=i)
            for i, family in enumerate(("llama", "qwen2"))}


@pytest.fixture(scope="session")
def make_llm(pinned_device: str, platform: Any, tiny_models: dict[str, Path]) -> Callable[..., Any]:
    """`make_llm(family="llama", **engine_kwargs)`: an LLM on the platform under test, with
    prefix caching and chunked prefill on exactly when the platform claims them. A
    block size the platform does not take becomes its smallest one (the tests ask for
    small blocks only to cross block boundaries with short prompts)."""
    from heron import LLM

    caps = platform.capabilities

    def make(family: str = "llama", **kwargs: Any) -> Any:
        kwargs.setdefault("dtype", "float32")
        kwargs.setdefault("kv_cache_memory_bytes", KV_BYTES)
        kwargs.setdefault("enable_prefix_caching", caps.prefix_caching)
        kwargs.setdefault("enable_chunked_prefill", caps.chunked_prefill)
        if caps.block_sizes and kwargs.get("block_size", min(caps.block_sizes)) not in caps.block_sizes:
            kwargs["block_size"] = min(caps.block_sizes)
        llm = LLM(str(tiny_models[family]), device=pinned_device, **kwargs)
        chosen = llm.llm_engine.platform.name
        assert chosen == pinned_device, f"asked for {pinned_device!r}, the engine runs on {chosen!r}"
        return llm
    return make
