"""The cuda platform: NVIDIA GPUs through torch.cuda.

Detection probes the driver's device files first and reads the torch build from
its installed metadata, so a machine without a GPU never imports torch for it.
Attention runs on the reference backend (plain torch) until the Triton kernels
land in their own issue; capabilities say no more than that path does.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from heron.platforms.interface import Capabilities, Detection, MemoryInfo, Platform
from heron.platforms.probes import device_files, env_hides_devices, torch_build

if TYPE_CHECKING:
    import torch

    from heron.kernels.interface import AttentionBackend


class CudaPlatform(Platform):
    """NVIDIA GPUs (and, through `RocmPlatform`, AMD GPUs: torch calls both "cuda")."""

    name = "cuda"
    device_type = "cuda"
    priority = 40
    capabilities = Capabilities(dtypes=frozenset({"float32", "float16", "bfloat16"}),
                                prefix_caching=True, chunked_prefill=True,
                                tensor_parallel=False, graph_capture=False)
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

    def attention_backend(self, dtype: "torch.dtype", head_size: int) -> type["AttentionBackend"]:
        from heron.kernels.registry import AttentionBackendRegistry
        return AttentionBackendRegistry.get("reference")

    def memory_info(self) -> MemoryInfo:
        """Device-wide free and total memory (cudaMemGetInfo). torch's caching allocator
        keeps what the profile run reserved, so the drop across it is peak activations."""
        import torch
        free, total = torch.cuda.mem_get_info(torch.cuda.current_device())
        return MemoryInfo(int(total), int(free))

    def set_up_process(self) -> None:
        import torch
        torch.cuda.set_device(0)  # one GPU per process; tensor parallel picks by rank later

    def seed_everything(self, seed: int) -> None:
        super().seed_everything(seed)
        import torch
        torch.cuda.manual_seed_all(seed)
