"""The cpu platform: PyTorch on the host CPU, with heron's C attention kernel."""
from __future__ import annotations

import os
import shutil
from typing import TYPE_CHECKING

from heron import envs
from heron.config import KV_CACHE_DTYPES
from heron.logger import get_logger
from heron.platforms.interface import (ALL_INVARIANCES, Capabilities, Detection, MemoryInfo,
                                      MemoryProfile, Platform, RankPlacement)
from heron.platforms.probes import host_memory_info

if TYPE_CHECKING:
    import torch

    from heron.config import EngineConfig
    from heron.kernels.interface import AttentionBackend, CompiledForward
    from heron.kernels.layer_ops import LayerOps


logger = get_logger(__name__)


def batch_invariant_mode() -> bool:
    """HERON_BATCH_INVARIANT (default on): whether linear layers run on heron's own kernel."""
    return (envs.get("HERON_BATCH_INVARIANT") or "1").strip().lower() not in ("0", "false", "no")


class CpuPlatform(Platform):
    """The host CPU: always available, lowest built-in priority."""

    name = "cpu"
    device_type = "cpu"
    priority = 0  # any accelerator that is present wins over the host CPU
    distributed_backend = "gloo"

    @property  # type: ignore[override]
    def capabilities(self) -> Capabilities:
        """Invariant in float32 and bfloat16 while its C kernels run the linear layers and
        the attention (the default; they need gcc). float16 runs on torch's kernels. Every
        kv_cache_dtype: the C attention reads and writes fp8 caches itself (the reference
        backend upcasts them)."""
        invariant = (batch_invariant_mode() and shutil.which("gcc") is not None
                     and envs.get("HERON_CPU_ATTENTION") != "reference")
        return Capabilities(dtypes=frozenset({"float32", "bfloat16", "float16"}),
                            prefix_caching=True, chunked_prefill=True, tensor_parallel=True,
                            invariances=ALL_INVARIANCES if invariant else frozenset(),
                            invariant_dtypes=frozenset({"float32", "bfloat16"}) if invariant
                            else frozenset(), graph_capture=True,
                            quantization=self._quantized_formats(),
                            kv_cache_dtypes=frozenset(KV_CACHE_DTYPES))

    @staticmethod
    def _quantized_formats() -> frozenset[str]:
        from heron.kernels.cpu_quant import CPU_KERNEL_FORMATS, load_quant
        return CPU_KERNEL_FORMATS if shutil.which("gcc") is not None and \
            load_quant()[0] is not None else frozenset()

    def detect(self) -> Detection:
        return Detection(True, f"{os.cpu_count()} CPU cores")

    def attention_backend(self, dtype: "torch.dtype", head_size: int) -> type["AttentionBackend"]:
        """The C kernel (which hands shapes it does not take to the reference backend),
        or the reference backend when HERON_CPU_ATTENTION=reference."""
        if envs.get("HERON_CPU_ATTENTION") == "reference":
            from heron.kernels.reference import ReferenceAttention
            return ReferenceAttention
        from heron.kernels.cpu import CpuAttention
        return CpuAttention

    def memory_info(self) -> MemoryInfo:
        return host_memory_info()

    def kv_cache_bytes(self, config: "EngineConfig", profile: MemoryProfile) -> int:
        """Fixed space, like vLLM's CPU backend: HERON_CPU_KVCACHE_SPACE GiB (default 4),
        unless kv_cache_memory_bytes is given."""
        if config.cache.kv_cache_memory_bytes is not None:
            return config.cache.kv_cache_memory_bytes
        space = float(envs.get("HERON_CPU_KVCACHE_SPACE") or 4)
        return int(space * 2**30)

    def prepare_model(self, model: "torch.nn.Module", dtype: "torch.dtype") -> "torch.nn.Module":
        """Quantized linear layers run on heron's quantized kernel (cpu_quant.c); dense
        ones on its batch-invariant kernel (float32, bfloat16); with
        HERON_BATCH_INVARIANT=0, bfloat16 weights are prepacked for oneDNN instead."""
        import torch

        from heron.kernels.cpu_quant import replace_quantized_layers
        if dtype in (torch.float32, torch.bfloat16):
            replace_quantized_layers(model, dtype)
        from heron.kernels.cpu_linear import (InvariantLinear, PackedLinear,
                                              invariant_linear_available, load_gemm,
                                              packing_available, replace_linear_layers)
        if batch_invariant_mode():
            if invariant_linear_available(dtype):
                replace_linear_layers(model, InvariantLinear, dtype)
                return model
            if dtype in (torch.float32, torch.bfloat16):
                logger.warning("the batch-invariant linear kernel is unavailable (%s): greedy "
                               "output may depend on batching", load_gemm()[1])
        if packing_available(dtype):
            replace_linear_layers(model, PackedLinear, dtype)
        return model

    def compiled_forward(self, model: "torch.nn.Module", attention: "AttentionBackend",
                         dtype: "torch.dtype") -> "CompiledForward | None":
        """The whole decoder in one C call (csrc/cpu_decoder.c) for Llama-family models on
        heron's invariant linears and C attention; None (logged) otherwise."""
        from heron.kernels.cpu_decoder import build_cpu_decoder
        return build_cpu_decoder(model, attention, dtype)

    def layer_ops(self, dtype: "torch.dtype") -> "LayerOps":
        """The C fused ops (csrc/cpu_ops.c) when they build here, else plain torch."""
        from heron.kernels.cpu_ops import load_ops
        from heron.kernels.layer_ops import LayerOps
        return load_ops() or LayerOps()

    def set_up_process(self, placement: RankPlacement) -> None:
        """HERON_CPU_NUM_THREADS torch threads per rank; by default the host's cores shared
        evenly among the ranks on it (two ranks on a 2-core host: one thread each)."""
        import torch
        threads = envs.get("HERON_CPU_NUM_THREADS")
        if threads:
            torch.set_num_threads(int(threads))
        elif placement.local_world_size > 1:
            cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") \
                else os.cpu_count() or 1
            torch.set_num_threads(max(1, cores // placement.local_world_size))
