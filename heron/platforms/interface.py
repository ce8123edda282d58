"""The Platform contract: what a hardware plugin gives the hardware-neutral core.

A plugin subclasses `Platform` once and registers an instance through the
`register_platforms` hook. The core never asks a platform "do you support X?"
through ad-hoc methods: it reads the frozen `Capabilities`, asks `validate()`
for reasons to refuse a configuration, and otherwise calls the members below
(nineteen in all). Nothing here imports torch at module level: `detect()` and
`heron platforms` must stay cheap; nor anything of heron's worker or executors:
dependencies run one way, from the executors to this contract. The worker side of
the contract (what an executor calls, what a model runner provides) is written down
in docs/writing-a-platform-plugin.md.

Priorities used by the built-ins, so third parties can place themselves:
cuda and rocm 40, xla and neuron 30, cpu 0, openvino -1 (chosen by name only: on
the CPUs measured, the cpu platform is as fast). An example or
debugging platform that must never win `device="auto"` uses a negative priority.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from enum import Enum
from typing import TYPE_CHECKING, ClassVar

if TYPE_CHECKING:  # heavy imports stay out of detection
    import torch

    from heron.config import EngineConfig
    from heron.distributed import TensorParallelGroup
    from heron.kernels.interface import AttentionBackend, CompiledForward
    from heron.kernels.layer_ops import LayerOps


@dataclass(frozen=True)
class Detection:
    """Whether a platform can run here, and why (or why not), in words a user can act on.

    Examples: ``Detection(False, "torch 2.13.0+cpu is a CPU-only build")``,
    ``Detection(True, "1 CUDA device, torch 2.6.0 (CUDA 12.4)")``.
    """
    available: bool
    reason: str


class Invariance(str, Enum):
    """A change of scheduling that must not change a greedy request's output.

    A platform that declares one guarantees more than equal tokens: the request's
    log-probabilities are the same bit for bit, so no near-tie can flip."""
    PREFIX_CACHE = "prefix_cache"        # its prefix came from the cache or was computed
    CHUNKED_PREFILL = "chunked_prefill"  # its prompt was computed in one step or in chunks
    PREEMPTION = "preemption"            # it was preempted and recomputed
    BATCH = "batch"                      # it ran alone or batched with other requests


ALL_INVARIANCES = frozenset(Invariance)


@dataclass(frozen=True)
class Capabilities:
    """What a platform can do, declared once; the conformance suite checks it against behaviour.

    `dtypes` are model dtypes (`float32`, `float16`, `bfloat16`) the platform runs; an
    empty set means it runs nothing yet. `prefix_caching` and `chunked_prefill` may be
    refused by `validate()` when False. `tensor_parallel` says whether a model may be
    split over several ranks on this platform (`tensor_parallel_size > 1`; the ranks
    talk through `Platform.distributed_backend`); `validate()` refuses it when False.
    `block_sizes` are the KV block sizes the platform's attention takes (empty: any
    power of two); the smallest is the default when the user names none.
    `invariances` are the scheduling changes under which greedy output stays bit for
    bit the same, in each of the `invariant_dtypes` (in its default settings, one rank);
    the conformance suite checks every one declared. Declaring none is honest for a
    platform whose kernels' results depend on the batch shape.
    `graph_capture` says that `compiled_forward` may return a compiled, captured or
    fused forward pass (a C layer loop, CUDA graphs, torch.compile ...) that computes
    what the eager model computes; the conformance suite compares the two.
    `speculative_decoding` says whether the platform verifies proposals (several
    tentative tokens per request in one step, logits at each of them) and runs a draft
    model; `validate()` refuses a `speculative_config` when False.
    `quantization` names the weight formats the platform's kernels run without making
    them dense (GGUF's `q4_0`, `q4_1`, `q4_k`, `q5_0`, `q8_0`, `q6_k`; heron's `int8`
    and `int4`): the loader keeps those quantized for `prepare_model` and dequantizes
    every other format of a GGUF file at load time; `validate()` refuses
    `quantization="int8"` or `"int4"` unless declared.
    `kv_cache_dtypes` are the `kv_cache_dtype` values (vLLM's: auto, fp8, fp8_e4m3,
    fp8_e5m2) its attention reads and writes; `validate()` refuses the others.
    """
    dtypes: frozenset[str] = frozenset({"float32"})
    prefix_caching: bool = True
    chunked_prefill: bool = True
    tensor_parallel: bool = False
    block_sizes: frozenset[int] = frozenset()
    invariances: frozenset[Invariance] = frozenset()
    invariant_dtypes: frozenset[str] = frozenset()
    graph_capture: bool = False
    speculative_decoding: bool = True
    quantization: frozenset[str] = frozenset()
    kv_cache_dtypes: frozenset[str] = frozenset({"auto"})

    @property
    def default_block_size(self) -> int:
        """The block size used when the configuration leaves it unset."""
        return min(self.block_sizes) if self.block_sizes else 16


@dataclass(frozen=True)
class MemoryInfo:
    """Device memory in bytes: all of it, and what is free now."""
    total_bytes: int
    available_bytes: int


@dataclass(frozen=True)
class RankPlacement:
    """Where one worker process stands: its rank among the model's `world_size` ranks, and
    among the `local_world_size` ranks on its own host (`local_rank`: which device to take,
    how many cores to use)."""
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1


@dataclass(frozen=True)
class MemoryProfile:
    """What the profile run measured: weights and peak activations in bytes, and the
    device memory right after the dummy forward pass."""
    weights_bytes: int
    peak_activation_bytes: int
    memory: MemoryInfo = field(default_factory=lambda: MemoryInfo(0, 0))


class Platform(ABC):
    """One kind of hardware. Subclasses set the class attributes and implement
    `detect`, `attention_backend` and `memory_info`; the rest has working defaults."""

    name: ClassVar[str]                 # what users pass as device=
    device_type: ClassVar[str]          # the torch device type models run on ("cpu", "cuda", ...)
    priority: ClassVar[int] = 0         # device="auto" picks the available platform with the highest
    capabilities: ClassVar[Capabilities] = Capabilities()
    distributed_backend: ClassVar[str] = "gloo"   # torch.distributed backend for tensor parallel

    @abstractmethod
    def detect(self) -> Detection:
        """Whether this platform can run here, and why. Called in the resolving process
        before anything is loaded, possibly several times.

        Cheap: import nothing heavy unless the device itself is present (probe
        ``/dev`` files first), and never raise: catch errors, ImportError included
        (placeholder packages on PyPI raise it on import), and return them as the
        reason. heron also turns an exception escaping `detect` into an unavailable
        Detection quoting it."""

    def validate(self, config: "EngineConfig") -> list[str]:
        """Reasons this platform cannot run `config` (empty when it can). Never mutates config.

        The engine calls it right after resolution and refuses to start, quoting
        every reason, when the list is not empty."""
        reasons = []
        dtype = config.model.dtype
        if dtype != "auto" and dtype not in self.capabilities.dtypes:
            supported = ", ".join(sorted(self.capabilities.dtypes)) or "none yet"
            reasons.append(f"dtype {dtype} is not supported on {self.name} (supported: {supported})")
        if config.cache.enable_prefix_caching and not self.capabilities.prefix_caching:
            reasons.append(f"{self.name} has no prefix caching; pass enable_prefix_caching=False")
        sizes = self.capabilities.block_sizes
        if config.cache.block_size is not None and sizes and config.cache.block_size not in sizes:
            allowed = ", ".join(map(str, sorted(sizes)))
            reasons.append(f"block_size {config.cache.block_size} is not supported on {self.name} "
                           f"(supported: {allowed}); pass block_size={min(sizes)} or leave it unset")
        kv_dtypes = self.capabilities.kv_cache_dtypes
        if config.cache.kv_cache_dtype not in kv_dtypes:
            reasons.append(f"kv_cache_dtype {config.cache.kv_cache_dtype!r} is not supported on "
                           f"{self.name} (supported: {', '.join(sorted(kv_dtypes))}); pass "
                           "kv_cache_dtype='auto'")
        if config.scheduler.enable_chunked_prefill and not self.capabilities.chunked_prefill:
            reasons.append(f"{self.name} has no chunked prefill; pass enable_chunked_prefill=False")
        if config.parallel.tensor_parallel_size > 1 and not self.capabilities.tensor_parallel:
            reasons.append(f"{self.name} cannot split a model over several ranks; pass "
                           "tensor_parallel_size=1")
        reasons += self._speculative_problems(config)
        reasons += self._quantization_problems(config)
        if config.parallel.pipeline_parallel_size > 1:
            reasons.append("pipeline parallelism is not implemented in heron yet; pass "
                           "pipeline_parallel_size=1 (tensor_parallel_size splits a model "
                           "over several processes or hosts)")
        return reasons

    def _quantization_problems(self, config: "EngineConfig") -> list[str]:
        method = config.model.quantization
        if method not in ("int8", "int4"):
            return []
        if method not in self.capabilities.quantization:
            runs = ", ".join(sorted(self.capabilities.quantization)) or "none"
            return [f"{self.name} has no kernel for {method} weights (it runs: {runs}); leave "
                    f"quantization unset"]
        if config.parallel.world_size > 1:
            return [f"quantization={method!r} runs on one rank only; pass tensor_parallel_size=1"]
        return []

    def _speculative_problems(self, config: "EngineConfig") -> list[str]:
        spec = config.speculative
        if spec is None:
            return []
        if not self.capabilities.speculative_decoding:
            return [f"{self.name} has no speculative decoding; leave speculative_config unset"]
        if spec.method == "draft_model" and config.parallel.world_size > 1:
            return ["a speculative draft model runs on one rank only; pass "
                    "tensor_parallel_size=1 or use method 'ngram'"]
        return []

    def complete_config(self, config: "EngineConfig") -> "EngineConfig":
        """A copy of `config` with what the user left unset (`block_size=None`) filled in for
        this platform: the one place a platform shapes the configuration. The engine and
        the executors call it; calling it again changes nothing."""
        import dataclasses

        if config.cache.block_size is not None:
            return config
        cache = dataclasses.replace(config.cache, block_size=self.capabilities.default_block_size)
        return dataclasses.replace(config, cache=cache)

    def torch_device(self) -> "torch.device":
        """The torch device that weights, activations and the KV cache live on."""
        import torch
        return torch.device(self.device_type)

    @abstractmethod
    def attention_backend(self, dtype: "torch.dtype", head_size: int) -> type["AttentionBackend"]:
        """The attention backend class for this dtype and head size (called in the process
        that runs the model, after `register_attention_backends`)."""

    @abstractmethod
    def memory_info(self) -> MemoryInfo:
        """Total and currently available device memory. The executor calls it before and
        after a dummy forward pass over `max_num_batched_tokens` tokens; the drop in
        available memory is the peak activation memory."""

    def kv_cache_bytes(self, config: "EngineConfig", profile: MemoryProfile) -> int:
        """Bytes the KV cache may take; the executor divides them into blocks.

        An explicit `kv_cache_memory_bytes` always wins. Otherwise a share
        (`gpu_memory_utilization`) of total memory, less weights and peak activations,
        and never more than was free after the profile run."""
        if config.cache.kv_cache_memory_bytes is not None:
            return config.cache.kv_cache_memory_bytes
        budget = int(profile.memory.total_bytes * config.cache.gpu_memory_utilization
                     - profile.weights_bytes - profile.peak_activation_bytes)
        if profile.memory.available_bytes > 0:
            budget = min(budget, profile.memory.available_bytes)
        return budget

    def executor_class(self) -> type | None:
        """An executor of the platform's own (a subclass of `heron.worker.executor.Executor`),
        or None, the default: the engine then picks heron's executor for the configuration's
        `distributed_executor_backend` (uni, mp or ray). Override only when the platform's
        runtime must own its processes."""
        return None

    def make_model_runner(self, config: "EngineConfig", model_path: str,
                          group: "TensorParallelGroup") -> object | None:
        """A model runner of the platform's own, or None, the default: heron's torch
        `ModelRunner`, which calls `attention_backend`, `prepare_model` and `layer_ops`.
        Called by the worker of each rank, in its process, after `set_up_process`. A
        platform whose models do not run in torch returns its runner here (the methods a
        runner provides are listed in docs/writing-a-platform-plugin.md)."""
        return None

    def prepare_model(self, model: "torch.nn.Module", dtype: "torch.dtype") -> "torch.nn.Module":
        """Called once after weights load: a platform may repack weights for its kernels
        (never change what the model computes). Returns the model to run."""
        return model

    def compiled_forward(self, model: "torch.nn.Module", attention: "AttentionBackend",
                         dtype: "torch.dtype") -> "CompiledForward | None":
        """A faster whole-model forward pass for `model` (prepared by `prepare_model`, on one
        rank), or None, the default: the runner calls the model's layers from Python.

        Called once per model runner after the model loads, unless `enforce_eager`. The
        result is called as `forward(input_ids, meta, kv_caches)` and returns the final
        hidden states [T, hidden], exactly those of `model(input_ids, meta.positions)`
        under the same forward context (heron/kernels/interface.py, CompiledForward).
        Only a platform whose capabilities declare `graph_capture` returns one."""
        return None

    def layer_ops(self, dtype: "torch.dtype") -> "LayerOps":
        """Fused element-wise ops (RMSNorm, rotary, SiLU-and-mul) for models on this platform;
        the default fuses nothing and the models use plain torch."""
        from heron.kernels.layer_ops import LayerOps
        return LayerOps()

    def set_up_process(self, placement: RankPlacement) -> None:
        """Called once in each process that runs a model runner, before the model loads
        (thread counts, the current device, environment for the device runtime).
        `placement` says which rank the process is, on its host and overall."""

    def seed_everything(self, seed: int) -> None:
        """Seed every random generator the model runner may use on this platform."""
        import random

        import torch
        random.seed(seed)
        torch.manual_seed(seed)
