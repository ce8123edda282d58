"""Engine configuration: a few small dataclasses, each validating its own values.

`EngineConfig.create(**kwargs)` takes the keyword arguments users pass to `LLM(...)`
(vLLM's names) and raises TypeError on an unknown one and ValueError on a bad value.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

_DTYPES = ("auto", "float32", "float16", "bfloat16")
_DTYPE_ALIASES = {"float": "float32", "fp32": "float32", "half": "float16", "fp16": "float16",
                  "bf16": "bfloat16"}


def normalize_dtype(dtype: Any) -> str:
    """Turn 'half', torch.float16 and friends into one of auto/float32/float16/bfloat16."""
    name = str(dtype).removeprefix("torch.")
    name = _DTYPE_ALIASES.get(name, name)
    if name not in _DTYPES:
        raise ValueError(f"dtype={dtype!r} is not supported; use one of {', '.join(_DTYPES)}")
    return name


@dataclass
class ModelConfig:
    """What to load. `model` is a Hugging Face folder; None means the embedded default model."""
    model: str | None = None
    tokenizer: str | None = None
    dtype: str = "auto"
    max_model_len: int | None = None
    seed: int = 0
    trust_remote_code: bool = False
    served_model_name: str | None = None

    def __post_init__(self) -> None:
        self.dtype = normalize_dtype(self.dtype)
        if self.max_model_len is not None and self.max_model_len < 1:
            raise ValueError(f"max_model_len must be at least 1, got {self.max_model_len}")


@dataclass
class CacheConfig:
    """The paged KV cache: block size, prefix caching and how much memory it gets.

    `block_size=None` takes the platform's default (16 on most; what the device
    requires where it fixes one, e.g. 32 on openvino's CPU device)."""
    block_size: int | None = None
    enable_prefix_caching: bool = True
    # An explicit size wins over the platform's own estimate.
    kv_cache_memory_bytes: int | None = None
    num_gpu_blocks_override: int | None = None
    gpu_memory_utilization: float = 0.9

    def __post_init__(self) -> None:
        if self.block_size is not None and (self.block_size < 1
                                            or self.block_size & (self.block_size - 1)):
            raise ValueError(f"block_size must be a power of two, got {self.block_size}")
        if self.num_gpu_blocks_override is not None and self.num_gpu_blocks_override < 1:
            raise ValueError("num_gpu_blocks_override must be at least 1, "
                             f"got {self.num_gpu_blocks_override}")
        if self.kv_cache_memory_bytes is not None and self.kv_cache_memory_bytes <= 0:
            raise ValueError(f"kv_cache_memory_bytes must be positive, got {self.kv_cache_memory_bytes}")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ValueError("gpu_memory_utilization must be in (0, 1], "
                             f"got {self.gpu_memory_utilization}")


@dataclass
class SchedulerConfig:
    """Continuous batching limits. `long_prefill_token_threshold` caps one prefill chunk."""
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2048
    enable_chunked_prefill: bool = True
    long_prefill_token_threshold: int = 0  # 0: no cap beyond the step's token budget

    def __post_init__(self) -> None:
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be at least 1, got {self.max_num_seqs}")
        if self.max_num_batched_tokens < 1:
            raise ValueError("max_num_batched_tokens must be at least 1, "
                             f"got {self.max_num_batched_tokens}")
        if self.long_prefill_token_threshold < 0:
            raise ValueError("long_prefill_token_threshold must be >= 0")


@dataclass
class DeviceConfig:
    """Which platform runs the model: 'auto' or a platform name (HERON_DEVICE overrides)."""
    device: str = "auto"


@dataclass
class EngineConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    device: DeviceConfig = field(default_factory=DeviceConfig)

    @classmethod
    def create(cls, **kwargs: Any) -> "EngineConfig":
        """Build from flat vLLM-style keyword arguments; unknown names raise TypeError."""
        parts: dict[str, dict[str, Any]] = {"model": {}, "cache": {}, "scheduler": {}, "device": {}}
        owners = {f.name: part for part, klass in
                  (("model", ModelConfig), ("cache", CacheConfig),
                   ("scheduler", SchedulerConfig), ("device", DeviceConfig))
                  for f in dataclasses.fields(klass)}
        for key, value in kwargs.items():
            if key not in owners:
                known = ", ".join(sorted(owners))
                raise TypeError(f"unknown engine argument {key!r}; known arguments: {known}")
            parts[owners[key]][key] = value
        return cls(model=ModelConfig(**parts["model"]), cache=CacheConfig(**parts["cache"]),
                   scheduler=SchedulerConfig(**parts["scheduler"]),
                   device=DeviceConfig(**parts["device"]))
