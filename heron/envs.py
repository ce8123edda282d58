"""Every HERON_* environment variable, declared once with its default.

Read them through the functions here (never through os.environ elsewhere) so that
`heron.envs.describe()` can list what a user may set.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class EnvVar:
    name: str
    default: str | None
    help: str


ENV_VARS: dict[str, EnvVar] = {
    v.name: v
    for v in [
        EnvVar("HERON_CACHE_DIR", None, "where heron keeps converted models and compiled kernels "
               "(default ~/.cache/heron)"),
        EnvVar("HERON_DEVICE", None, "overrides device= (e.g. cpu, cuda, openvino)"),
        EnvVar("HERON_PLUGINS", None, "comma-separated allowlist of plugin names to load "
               "(unset: all, empty: none)"),
        EnvVar("HERON_CPU_KVCACHE_SPACE", "4", "GiB of memory for the KV cache on the cpu platform"),
        EnvVar("HERON_CPU_NUM_THREADS", None, "torch threads on the cpu platform (default: all cores)"),
        EnvVar("HERON_BATCH_INVARIANT", "1", "0: the cpu platform runs its linear layers on "
               "oneDNN/BLAS, faster on some CPUs, but then greedy output may depend on batching, "
               "chunking, prefix-cache hits and preemption"),
        EnvVar("HERON_CPU_ATTENTION", "auto", "cpu attention backend: auto, native (C kernel) or reference"),
        EnvVar("HERON_OPENVINO_DEVICE", "CPU", "OpenVINO device the openvino platform compiles for"),
        EnvVar("HERON_OPENVINO_KVCACHE_SPACE", "4", "GiB of memory for the KV cache on the openvino platform"),
        EnvVar("HERON_OPENVINO_INFERENCE_PRECISION", None, "openvino compute precision: f32, bf16 or f16 "
               "(default: f32 for float32 models, else the device's default)"),
        EnvVar("HERON_OPENVINO_KV_CACHE_PRECISION", None, "openvino KV-cache precision: u8, f16, bf16 "
               "or f32 (default: the inference precision)"),
        EnvVar("HERON_OPENVINO_NUM_THREADS", None, "OpenVINO inference threads (default: all cores)"),
        EnvVar("HERON_OPENVINO_CACHE_DIR", None, "converted and compiled OpenVINO models "
               "(default HERON_CACHE_DIR/openvino)"),
        EnvVar("HERON_WORKER_TIMEOUT_SECONDS", "300", "seconds a worker rank may take to answer one "
               "step (and a collective to complete) before it is declared failed"),
        EnvVar("HERON_SHM_ALL_REDUCE", "1", "0: tensor-parallel ranks on one host sum over gloo "
               "instead of shared memory (for comparison)"),
        EnvVar("HERON_API_KEY", None, "API key `heron serve` requires on /v1/* (same as --api-key)"),
        EnvVar("HERON_LOGGING_LEVEL", "INFO", "log level of the heron logger"),
    ]
}


def get(name: str) -> str | None:
    """The value of a declared HERON_* variable, or its default."""
    var = ENV_VARS[name]
    return os.environ.get(name, var.default)


def cache_dir() -> Path:
    """HERON_CACHE_DIR, or ~/.cache/heron."""
    value = get("HERON_CACHE_DIR")
    return Path(value).expanduser() if value else Path.home() / ".cache" / "heron"


def describe() -> str:
    return "\n".join(f"{v.name} (default {v.default!r}): {v.help}" for v in ENV_VARS.values())
