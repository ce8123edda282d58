"""Settings of the openvino platform: OpenVINO device, precisions, KV-cache size, caches.

Each has a HERON_OPENVINO_* variable (the counterparts of vLLM's VLLM_OPENVINO_*);
`OpenVinoPlatform(options=...)` takes them directly.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Collection

from heron import envs

PRECISIONS = ("f32", "bf16", "f16")
KV_CACHE_PRECISIONS = ("u8", "f16", "bf16", "f32")
_MODEL_PRECISION = {"torch.float32": "f32", "torch.bfloat16": "bf16", "torch.float16": "f16"}


@dataclass(frozen=True)
class OpenVinoOptions:
    """`inference_precision` None: f32 for float32 models, else OpenVINO's default for the
    device (bf16 on CPUs with bf16 instructions). `kv_cache_precision` None: the inference
    precision; u8 quantises the cache (smaller, approximate)."""
    device: str = "CPU"
    inference_precision: str | None = None
    kv_cache_precision: str | None = None
    kv_cache_space_gib: float = 4.0
    num_threads: int | None = None
    cache_dir: str | None = None

    def __post_init__(self) -> None:
        if self.inference_precision not in (None, *PRECISIONS):
            raise ValueError(f"OpenVINO inference precision {self.inference_precision!r} is not "
                             f"one of {', '.join(PRECISIONS)} (HERON_OPENVINO_INFERENCE_PRECISION)")
        if self.kv_cache_precision not in (None, *KV_CACHE_PRECISIONS):
            raise ValueError(f"OpenVINO KV-cache precision {self.kv_cache_precision!r} is not one "
                             f"of {', '.join(KV_CACHE_PRECISIONS)} (HERON_OPENVINO_KV_CACHE_PRECISION)")
        if self.kv_cache_space_gib <= 0:
            raise ValueError(f"HERON_OPENVINO_KVCACHE_SPACE must be positive, got {self.kv_cache_space_gib}")

    @classmethod
    def from_env(cls) -> "OpenVinoOptions":
        threads = envs.get("HERON_OPENVINO_NUM_THREADS")
        return cls(device=envs.get("HERON_OPENVINO_DEVICE") or "CPU",
                   inference_precision=envs.get("HERON_OPENVINO_INFERENCE_PRECISION") or None,
                   kv_cache_precision=envs.get("HERON_OPENVINO_KV_CACHE_PRECISION") or None,
                   kv_cache_space_gib=float(envs.get("HERON_OPENVINO_KVCACHE_SPACE") or 4),
                   num_threads=int(threads) if threads else None,
                   cache_dir=envs.get("HERON_OPENVINO_CACHE_DIR") or None)

    def cache_path(self, kind: str) -> Path:
        """Where converted ("ir") or compiled ("compiled") models are kept."""
        root = Path(self.cache_dir).expanduser() if self.cache_dir else envs.cache_dir() / "openvino"
        return root / kind

    def precision_for(self, model_dtype: Any) -> str | None:
        if self.inference_precision:
            return self.inference_precision
        return "f32" if str(model_dtype) == "torch.float32" else None

    def compile_properties(self, model_dtype: Any,
                           device_capabilities: Collection[str] | None = None) -> dict[str, Any]:
        """Properties for `Core.compile_model`. `device_capabilities` is the device's
        OPTIMIZATION_CAPABILITIES (None: not known)."""
        props: dict[str, Any] = {"PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": 1}
        precision = self.precision_for(model_dtype)
        if precision:
            props["INFERENCE_PRECISION_HINT"] = precision
        kv = self.kv_cache_precision or precision or _MODEL_PRECISION.get(str(model_dtype))
        if kv == "bf16" and not self.kv_cache_precision and device_capabilities is not None \
                and "BF16" not in device_capabilities:
            # A CPU without bf16 instructions (AVX2 only) computes bf16 models in f32, and
            # its PagedAttention then takes only an f32 (or f16, u8) cache.
            kv = "f32"
        if kv:
            props["KV_CACHE_PRECISION"] = kv
        if self.num_threads:
            props["INFERENCE_NUM_THREADS"] = self.num_threads
        return props
