"""The cuda and rocm platforms' wiring, checked without a GPU: backend choice,
registration, capabilities, memory measurement and validation."""
from __future__ import annotations

import importlib.util
import subprocess
import sys

import pytest
import torch

from heron.config import EngineConfig
from heron.kernels.reference import ReferenceAttention
from heron.platforms.cuda.platform import CudaPlatform
from heron.platforms.interface import MemoryInfo, MemoryProfile
from heron.platforms.rocm.platform import RocmPlatform

has_triton = importlib.util.find_spec("triton") is not None
PLATFORMS = [CudaPlatform, RocmPlatform]


@pytest.mark.skipif(not has_triton, reason="triton is not installed")
@pytest.mark.parametrize("platform_cls", PLATFORMS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_attention_runs_on_the_triton_backend(platform_cls, dtype):
    from heron.kernels.triton_attention import TritonAttention
    assert platform_cls().attention_backend(dtype, 64) is TritonAttention
    assert platform_cls().attention_backend(dtype, 512) is ReferenceAttention   # over 256


def test_without_triton_the_reference_backend_serves(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "triton" else real(name, *a))
    assert CudaPlatform().attention_backend(torch.bfloat16, 64) is ReferenceAttention


def test_plugins_register_the_triton_backend():
    from heron.kernels.registry import AttentionBackendRegistry
    from heron.kernels.triton_attention import TritonAttention
    from heron.platforms.registry import load_extensions
    load_extensions()
    assert AttentionBackendRegistry.get("triton") is TritonAttention


def test_detection_and_registration_import_no_triton():
    code = ("import sys\n"
            "from heron.platforms.registry import load_extensions, make_plugin_manager\n"
            "from heron.platforms.cuda.platform import CudaPlatform\n"
            "from heron.platforms.rocm.platform import RocmPlatform\n"
            "CudaPlatform().detect(); RocmPlatform().detect(); load_extensions()\n"
            "assert 'triton' not in sys.modules, 'triton was imported'\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]


@pytest.mark.parametrize("platform_cls", PLATFORMS)
def test_capabilities_say_what_the_kernels_do(platform_cls):
    caps = platform_cls.capabilities
    assert {"bfloat16", "float16", "float32"} <= caps.dtypes
    assert caps.prefix_caching and caps.chunked_prefill
    # Tensor parallel over nccl: the torch.distributed path the cpu platform runs over gloo.
    assert caps.tensor_parallel and platform_cls.distributed_backend == "nccl"


def test_memory_is_measured_with_mem_get_info(monkeypatch):
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (30 * 2**30, 80 * 2**30))
    assert CudaPlatform().memory_info() == MemoryInfo(80 * 2**30, 30 * 2**30)


def test_kv_blocks_take_gpu_memory_utilization_of_the_card():
    config = EngineConfig.create(model="unused")
    assert config.cache.gpu_memory_utilization == 0.9
    profile = MemoryProfile(weights_bytes=10 * 2**30, peak_activation_bytes=2 * 2**30,
                            memory=MemoryInfo(80 * 2**30, 60 * 2**30))
    assert CudaPlatform().kv_cache_bytes(config, profile) == int(80 * 2**30 * 0.9) - 12 * 2**30
    config = EngineConfig.create(model="unused", gpu_memory_utilization=0.5)
    assert CudaPlatform().kv_cache_bytes(config, profile) == 40 * 2**30 - 12 * 2**30


@pytest.mark.parametrize("platform_cls", PLATFORMS)
def test_validate_accepts_the_gpu_dtypes(platform_cls):
    for dtype in ("bfloat16", "float16", "float32", "auto"):
        assert platform_cls().validate(EngineConfig.create(model="unused", dtype=dtype)) == []
