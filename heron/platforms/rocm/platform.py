"""The rocm platform: AMD GPUs through torch's HIP build (torch still calls them "cuda")."""
from __future__ import annotations

from heron.platforms.cuda.platform import CudaPlatform


class RocmPlatform(CudaPlatform):
    """AMD Instinct / Radeon GPUs. Same execution path as cuda; detection differs:
    the ROCm kernel driver's /dev/kfd and a torch built for ROCm (torch.version.hip)."""

    name = "rocm"
    device_type = "cuda"   # HIP devices are torch.device("cuda") in a ROCm build of torch
    priority = 40
    distributed_backend = "nccl"  # RCCL, under torch.distributed's NCCL name
    build_kind = "rocm"
    device_globs = ("/dev/kfd",)
    visibility_var = "HIP_VISIBLE_DEVICES"
    vendor = "AMD"
    runtime = "ROCm"

    @staticmethod
    def _runtime_version(torch_module: object) -> str:
        hip = getattr(getattr(torch_module, "version", None), "hip", None)
        return f" (HIP {hip})" if hip else ""
