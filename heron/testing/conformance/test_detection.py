"""The detection contract and the shape of the platform's declarations."""
from __future__ import annotations

import copy
import dataclasses
import json
import subprocess
import sys
from typing import Any

import pytest

from heron.config import EngineConfig
from heron.kernels.interface import AttentionBackend
from heron.platforms.interface import Capabilities, Detection, Platform

# detect() in a fresh process, imports included. Generous: an available accelerator
# may import torch to count its devices; an unavailable one should take milliseconds.
DETECT_BUDGET_S = 5.0
MODEL_DTYPES = {"float32", "float16", "bfloat16"}

_PROBE = """
import json, sys, time
from heron.platforms.plugins import make_plugin_manager
name = sys.argv[1]
pm = make_plugin_manager()
platform = {e.platform.name: e.platform for e in pm.platforms()}[name]
start = time.perf_counter()
d = platform.detect()
print(json.dumps({"seconds": time.perf_counter() - start, "available": d.available,
                  "reason": d.reason}))
"""


def test_detect_returns_a_detection_and_never_raises(platform: Platform) -> None:
    for _ in range(3):  # repeatable: called by resolution, `heron platforms`, the engine
        detection = platform.detect()
        assert isinstance(detection, Detection)
        assert isinstance(detection.available, bool)
        assert isinstance(detection.reason, str) and detection.reason.strip(), \
            "detect() must say why, available or not"
    assert detection.available, f"{platform.name} is under test but says: {detection.reason}"


def test_detect_is_fast_in_a_fresh_process(platform: Platform) -> None:
    out = subprocess.run([sys.executable, "-c", _PROBE, platform.name], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["seconds"] < DETECT_BUDGET_S, f"detect() took {result['seconds']:.2f} s"
    assert result["available"] is True, result["reason"]


def test_platform_comes_from_a_loaded_plugin(platform_entry: Any) -> None:
    plugin = platform_entry.plugin
    assert plugin.error is None
    assert plugin.package and plugin.version, "the plugin's package must be known for reports"


def test_declarations_are_typed(platform: Platform) -> None:
    assert isinstance(platform.name, str) and platform.name == platform.name.strip().lower()
    assert platform.name != "auto", "'auto' is reserved for resolution"
    assert isinstance(platform.device_type, str) and platform.device_type
    assert isinstance(platform.priority, int)
    assert isinstance(platform.distributed_backend, str)
    caps = platform.capabilities
    assert isinstance(caps, Capabilities)
    with pytest.raises(dataclasses.FrozenInstanceError):
        caps.prefix_caching = not caps.prefix_caching  # type: ignore[misc]
    assert caps.dtypes, f"{platform.name} declares no dtype: it cannot run any model"
    assert set(caps.dtypes) <= MODEL_DTYPES, f"unknown dtypes {set(caps.dtypes) - MODEL_DTYPES}"
    assert all(isinstance(b, int) and b > 0 and not b & (b - 1) for b in caps.block_sizes), \
        f"block sizes must be powers of two: {sorted(caps.block_sizes)}"


def test_validate_returns_reasons_and_never_mutates(platform: Platform, tiny_models: Any) -> None:
    for dtype in sorted(MODEL_DTYPES):
        config = EngineConfig.create(model=str(tiny_models["llama"]), dtype=dtype,
                                     device=platform.name,
                                     enable_prefix_caching=platform.capabilities.prefix_caching,
                                     enable_chunked_prefill=platform.capabilities.chunked_prefill)
        before = copy.deepcopy(config)
        reasons = platform.validate(config)
        assert config == before, "validate() must not change the configuration"
        assert isinstance(reasons, list) and all(isinstance(r, str) for r in reasons)
        if dtype in platform.capabilities.dtypes:
            assert reasons == [], f"declared dtype {dtype} refused: {reasons}"
            _check_block_sizes(platform, config)
        else:
            assert any(dtype in r for r in reasons), f"undeclared dtype {dtype} accepted"


def test_attention_backend_for_every_declared_dtype(platform: Platform) -> None:
    import torch

    for dtype in sorted(platform.capabilities.dtypes):
        for head_size in (16, 64, 128):
            backend = platform.attention_backend(getattr(torch, dtype), head_size)
            assert isinstance(backend, type) and issubclass(backend, AttentionBackend)
            assert isinstance(backend.name, str) and backend.name


def _check_block_sizes(platform: Platform, config: EngineConfig) -> None:
    """An undeclared block size is refused with a reason naming it; a declared one is not."""
    sizes = platform.capabilities.block_sizes
    if not sizes:
        return
    for size in (min(sizes), max(sizes) * 2):
        reasons = platform.validate(dataclasses.replace(
            config, cache=dataclasses.replace(config.cache, block_size=size)))
        if size in sizes:
            assert reasons == [], f"declared block size {size} refused: {reasons}"
        else:
            assert any(f"block_size {size}" in r for r in reasons), \
                f"undeclared block size {size} accepted"
