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


QUANTIZATION_METHODS = (None, "int8", "int4", "gguf")


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
    # True: every forward pass runs layer by layer from Python, even where the platform
    # offers a compiled or captured one (Capabilities.graph_capture). vLLM's name.
    enforce_eager: bool = False
    # Weight-only quantization of an ordinary checkpoint: "int8" (per channel) or "int4"
    # (groups of 32); "gguf" only says that the model is a GGUF file (vLLM's names).
    quantization: str | None = None

    def __post_init__(self) -> None:
        self.dtype = normalize_dtype(self.dtype)
        if self.quantization not in QUANTIZATION_METHODS:
            raise ValueError(f"unknown quantization {self.quantization!r}: use int8 (per channel)"
                             f", int4 (groups of 32) or gguf (a .gguf model file), or leave it "
                             f"unset")
        if self.quantization == "gguf" and not str(self.model or "").lower().endswith(".gguf"):
            raise ValueError("quantization='gguf' needs a .gguf model file; a GGUF file keeps "
                             "its own formats without it")
        if self.max_model_len is not None and self.max_model_len < 1:
            raise ValueError(f"max_model_len must be at least 1, got {self.max_model_len}")


# vLLM's kv_cache_dtype values: "auto" is the model's dtype; "fp8" means fp8_e4m3
# (float8_e4m3fn), as in vLLM on CUDA and CPU.
KV_CACHE_DTYPES = ("auto", "fp8", "fp8_e4m3", "fp8_e5m2")


@dataclass
class CacheConfig:
    """The paged KV cache: block size, prefix caching, element type and how much memory it gets.

    `block_size=None` takes the platform's default (16 on most; what the device
    requires where it fixes one, e.g. 32 on openvino's CPU device).
    `kv_cache_dtype` (vLLM's name): "auto" stores keys and values in the model's dtype;
    "fp8" / "fp8_e4m3" and "fp8_e5m2" in one byte each, which halves the cache against
    bfloat16 (twice the tokens in the same memory), on platforms whose capabilities
    declare it."""
    block_size: int | None = None
    enable_prefix_caching: bool = True
    # An explicit size wins over the platform's own estimate.
    kv_cache_memory_bytes: int | None = None
    num_gpu_blocks_override: int | None = None
    gpu_memory_utilization: float = 0.9
    kv_cache_dtype: str = "auto"

    def __post_init__(self) -> None:
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(f"kv_cache_dtype={self.kv_cache_dtype!r} is not supported; use one "
                             f"of {', '.join(KV_CACHE_DTYPES)}")
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


# vLLM's names for the executors: one process, one process per rank on this host, Ray actors.
EXECUTOR_BACKENDS = ("uni", "mp", "ray")


@dataclass
class ParallelConfig:
    """How one model is spread over processes (vLLM's names).

    `tensor_parallel_size` ranks each hold a shard of every layer's weights and of the KV
    cache. `distributed_executor_backend` chooses how the ranks run: "uni" (in the
    engine's process, one rank only), "mp" (one process per rank on this host) or
    "ray" (Ray actors, possibly on several hosts); None picks "uni" for one rank and
    "mp" for more. `pipeline_parallel_size` is accepted so that platforms can refuse it
    with a reason (no built-in platform splits layers across ranks yet)."""
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    distributed_executor_backend: str | None = None

    def __post_init__(self) -> None:
        for name in ("tensor_parallel_size", "pipeline_parallel_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a whole number of at least 1, got {value!r}")
        backend = self.distributed_executor_backend
        if backend is not None and backend not in EXECUTOR_BACKENDS:
            raise ValueError(f"distributed_executor_backend={backend!r} is not one of "
                             f"{', '.join(EXECUTOR_BACKENDS)}")
        if backend == "uni" and self.world_size > 1:
            raise ValueError(f"distributed_executor_backend='uni' runs one rank, but "
                             f"tensor_parallel_size x pipeline_parallel_size is {self.world_size}; "
                             "use 'mp' (this host) or 'ray'")

    @property
    def world_size(self) -> int:
        """The number of ranks (worker processes) that run the model."""
        return self.tensor_parallel_size * self.pipeline_parallel_size

    @property
    def executor_backend(self) -> str:
        """The backend in effect: the one asked for, else "uni" for one rank, "mp" for more."""
        if self.distributed_executor_backend is not None:
            return self.distributed_executor_backend
        return "uni" if self.world_size == 1 else "mp"


SPECULATIVE_METHODS = ("ngram", "draft_model")


@dataclass
class SpeculativeConfig:
    """Speculative decoding (vLLM's `speculative_config`): propose `num_speculative_tokens`
    tokens per decoding request and verify them in one forward pass of the target model.

    `method="ngram"` proposes by prompt lookup: the tokens that followed the latest
    earlier occurrence of the sequence's last n tokens, for n from `prompt_lookup_max`
    down to `prompt_lookup_min`. A `model` (a local Hugging Face folder of a smaller
    model with the same tokenizer) implies `method="draft_model"`."""
    method: str | None = None
    num_speculative_tokens: int | None = None
    model: str | None = None
    prompt_lookup_max: int | None = None
    prompt_lookup_min: int | None = None

    def __post_init__(self) -> None:
        if self.method is None and self.model:
            self.method = "draft_model"
        if self.method == "[ngram]":   # vLLM's older spelling
            self.method = "ngram"
        if self.method not in SPECULATIVE_METHODS:
            raise ValueError(f"speculative_config: method={self.method!r} is not supported; use "
                             "'ngram' or give a draft 'model' (method 'draft_model')")
        k = self.num_speculative_tokens
        if k is None or isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError("speculative_config: num_speculative_tokens must be a whole number "
                             f"of at least 1, got {k!r}")
        if self.method == "draft_model":
            if not self.model:
                raise ValueError("speculative_config: method 'draft_model' needs 'model' "
                                 "(a local Hugging Face folder)")
            if self.prompt_lookup_max is not None or self.prompt_lookup_min is not None:
                raise ValueError("speculative_config: prompt_lookup_max/prompt_lookup_min only "
                                 "apply to method 'ngram'")
            return
        if self.model is not None:
            raise ValueError("speculative_config: method 'ngram' takes no 'model'")
        self._resolve_lookup_bounds()

    def _resolve_lookup_bounds(self) -> None:
        # vLLM's rule: both default to 5; one given sets the other.
        lo, hi = self.prompt_lookup_min, self.prompt_lookup_max
        for name, value in (("prompt_lookup_min", lo), ("prompt_lookup_max", hi)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                      or value < 1):
                raise ValueError(f"speculative_config: {name} must be a whole number of at "
                                 f"least 1, got {value!r}")
        if lo is None and hi is None:
            lo = hi = 5
        elif lo is None:
            lo = hi
        elif hi is None:
            hi = lo
        if lo > hi:
            raise ValueError(f"speculative_config: prompt_lookup_min ({lo}) is larger than "
                             f"prompt_lookup_max ({hi})")
        self.prompt_lookup_min, self.prompt_lookup_max = lo, hi

    @classmethod
    def from_value(cls, value: "SpeculativeConfig | dict[str, Any] | None") -> "SpeculativeConfig | None":
        """Accept what users pass as `speculative_config=`: a dict (vLLM's keys), a
        SpeculativeConfig or None. Unknown keys raise ValueError naming them."""
        if value is None or isinstance(value, SpeculativeConfig):
            return value
        if not isinstance(value, dict):
            raise ValueError("speculative_config must be a dict such as "
                             '{"method": "ngram", "num_speculative_tokens": 4}, '
                             f"got {type(value).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(value) - known)
        if unknown:
            raise ValueError(f"speculative_config: unknown key {unknown[0]!r}; known keys: "
                             + ", ".join(sorted(known)))
        return cls(**value)


@dataclass
class EngineConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    device: DeviceConfig = field(default_factory=DeviceConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    speculative: SpeculativeConfig | None = None

    @classmethod
    def create(cls, **kwargs: Any) -> "EngineConfig":
        """Build from flat vLLM-style keyword arguments; unknown names raise TypeError."""
        classes = {"model": ModelConfig, "cache": CacheConfig, "scheduler": SchedulerConfig,
                   "device": DeviceConfig, "parallel": ParallelConfig}
        speculative = SpeculativeConfig.from_value(kwargs.pop("speculative_config", None))
        parts: dict[str, dict[str, Any]] = {part: {} for part in classes}
        owners = {f.name: part for part, klass in classes.items()
                  for f in dataclasses.fields(klass)}
        for key, value in kwargs.items():
            if key not in owners:
                known = ", ".join(sorted([*owners, "speculative_config"]))
                raise TypeError(f"unknown engine argument {key!r}; known arguments: {known}")
            parts[owners[key]][key] = value
        return cls(**{part: klass(**parts[part]) for part, klass in classes.items()},
                   speculative=speculative)
