"""The cuda platform: NVIDIA GPUs through torch.cuda.

Detection probes the driver's device files first and reads the torch build from
its installed metadata, so a machine without a GPU never imports torch for it.

Attention runs on the Triton kernels (heron.kernels.triton_attention), one source
for NVIDIA and AMD GPUs, in float16, bfloat16 and float32 (float32 dots in full
precision, not TF32). Without triton installed it falls back to the reference
backend (plain torch, slow) with a warning. KV blocks come from the executor's
profile run: total memory x gpu_memory_utilization (default 0.9), less weights
and the peak activations that torch.cuda.mem_get_info saw the dummy forward pass
take. No CUDA graphs (nothing measured them yet), no tensor parallelism.
"""
from __future__ import annotations

import importlib.util
from typing import TYPE_CHECKING

from heron.logger import get_logger
from heron.platforms.interface import Capabilities, Detection, MemoryInfo, Platform, RankPlacement
from heron.platforms.probes import device_files, env_hides_devices, torch_build

if TYPE_CHECKING:
    import torch

    from heron.config import EngineConfig
    from heron.kernels.interface import AttentionBackend

logger = get_logger(__name__)


class CudaPlatform(Platform):
    """NVIDIA GPUs (and, through `RocmPlatform`, AMD GPUs: torch calls both "cuda")."""

    name = "cuda"
    device_type = "cuda"
    priority = 40
    capabilities = Capabilities(dtypes=frozenset({"float32", "float16", "bfloat16"}),
                                prefix_caching=True, chunked_prefill=True, tensor_parallel=True)
    distributed_backend = "nccl"
    # What torch_build() must say, the device files that prove a GPU, and the variable
    # that can hide every device: the three things RocmPlatform changes.
    build_kind = "cuda"
    device_globs: tuple[str, ...] = ("/dev/nvidia[0-9]*", "/proc/driver/nvidia/gpus/*")
    visibility_var = "CUDA_VISIBLE_DEVICES"
    vendor = "NVIDIA"
    runtime = "CUDA"

    def detect(self) -> Detection:
        build = torch_build()
        found = device_files(*self.device_globs)
        problems = []
        if not found:
            problems.append(f"no {self.vendor} GPU (none of {', '.join(self.device_globs)})")
        if build.kind is None:
            problems.append("torch is not installed")
        elif build.kind not in (self.build_kind, "unknown"):
            problems.append(f"torch {build.version} is a +{build.kind} build, not a "
                            f"{self.runtime} one")
        if env_hides_devices(self.visibility_var):
            problems.append(f"{self.visibility_var} hides every device")
        if problems:
            return Detection(False, "; ".join(problems))
        # A GPU and a matching torch build: only now is importing torch worth it.
        try:
            import torch
            count = torch.cuda.device_count()
        except Exception as e:  # noqa: BLE001 - a broken driver is a reason, not a crash
            return Detection(False, f"torch.cuda failed: {type(e).__name__}: {e}")
        if not self._runtime_version(torch):
            return Detection(False, f"torch {torch.__version__} is not a {self.runtime} build")
        if count == 0:
            return Detection(False, f"torch {build.version} sees no {self.vendor} GPU "
                                    "(driver not loaded, or no permission on the device files)")
        return Detection(True, f"{count} {self.vendor} GPU(s), torch {build.version}"
                               f"{self._runtime_version(torch)}")

    @staticmethod
    def _runtime_version(torch_module: object) -> str:
        cuda = getattr(getattr(torch_module, "version", None), "cuda", None)
        return f" (CUDA {cuda})" if cuda else ""

    def attention_backend(self, dtype: torch.dtype, head_size: int) -> type[AttentionBackend]:
        """The Triton kernels; the reference backend when triton is missing or the head
        size is over what they take (256)."""
        from heron.kernels.reference import ReferenceAttention
        if importlib.util.find_spec("triton") is None:
            logger.warning("triton is not installed: attention on %s runs the slow reference "
                           "backend; pip install 'heron[cuda]' (or triton) for the kernels",
                           self.name)
            return ReferenceAttention
        if head_size > 256:
            logger.warning("head size %d is over the triton kernels' 256: attention on %s runs "
                           "the slow reference backend", head_size, self.name)
            return ReferenceAttention
        from heron.kernels.triton_attention import TritonAttention
        return TritonAttention

    def validate(self, config: EngineConfig) -> list[str]:
        """The base checks, plus: bfloat16 needs a GPU that has it (NVIDIA sm_80 and later,
        AMD CDNA2 and later); asked only when a GPU is present."""
        reasons = super().validate(config)
        if config.model.dtype == "bfloat16" and self.detect().available:
            import torch
            if not torch.cuda.is_bf16_supported():
                reasons.append(f"this {self.vendor} GPU has no bfloat16; pass dtype='float16'")
        return reasons

    def memory_info(self) -> MemoryInfo:
        """Device-wide free and total memory (cudaMemGetInfo). torch's caching allocator
        keeps what the profile run reserved, so the drop across it is peak activations."""
        import torch
        free, total = torch.cuda.mem_get_info(torch.cuda.current_device())
        return MemoryInfo(int(total), int(free))

    def set_up_process(self, placement: RankPlacement) -> None:
        """One GPU per rank: the host's local_rank-th visible device."""
        import torch
        torch.cuda.set_device(placement.local_rank)

    def seed_everything(self, seed: int) -> None:
        super().seed_everything(seed)
        import torch
        torch.cuda.manual_seed_all(seed)
