"""The openvino platform: heron's models compiled by OpenVINO, with heron's scheduler and KV
cache in charge.

heron's torch model is converted to OpenVINO once (attention becomes OpenVINO's
PagedAttention node, see heron/kernels/openvino_attention.py), compiled for the
OpenVINO device, and run one step per inference with heron's block tables as
inputs; the KV cache is a set of OpenVINO tensors heron allocates and whose
blocks heron's KV-cache manager hands out. Settings: `OpenVinoOptions`
(HERON_OPENVINO_* variables).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from heron.platforms.interface import Capabilities, Detection, MemoryInfo, MemoryProfile, Platform
from heron.platforms.probes import host_memory_info, module_installed, try_import

if TYPE_CHECKING:
    import torch

    from heron.config import EngineConfig
    from heron.kernels.interface import AttentionBackend
    from heron.platforms.openvino.options import OpenVinoOptions
    from heron.distributed import TensorParallelGroup


class OpenVinoPlatform(Platform):
    """OpenVINO's CPU device (Intel and AMD x86 CPUs)."""

    name = "openvino"
    device_type = "cpu"   # OpenVINO takes host tensors; it places work on its own devices
    # Below cpu, so device="auto" keeps the cpu platform: on the CPUs measured (README,
    # docs/openvino.md) heron's torch path is as fast or faster and starts sooner.
    # device="openvino" (or HERON_DEVICE=openvino) chooses it.
    priority = -1
    # OpenVINO's CPU PagedAttention stores 32 tokens per block, whatever the cache precision.
    capabilities = Capabilities(dtypes=frozenset({"float32", "bfloat16", "float16"}),
                                prefix_caching=True, chunked_prefill=True,
                                block_sizes=frozenset({32}))

    def __init__(self, options: "OpenVinoOptions | None" = None) -> None:
        self._options = options

    @property
    def options(self) -> "OpenVinoOptions":
        """The settings given to the constructor, else those of the HERON_OPENVINO_* variables
        (read when first needed, so that detection stays cheap)."""
        if self._options is None:
            from heron.platforms.openvino.options import OpenVinoOptions
            self._options = OpenVinoOptions.from_env()
        return self._options

    def detect(self) -> Detection:
        # There is no device file to probe: OpenVINO's devices are enumerated by its
        # runtime, which is only imported when the package is there at all.
        if not module_installed("openvino"):
            return Detection(False, "openvino is not installed (pip install 'heron[openvino]')")
        ov, error = try_import("openvino")
        if ov is None:
            return Detection(False, f"openvino does not import: {error}")
        try:
            devices = [str(d) for d in ov.Core().available_devices]  # type: ignore[attr-defined]
        except Exception as e:  # noqa: BLE001 - a broken runtime is a reason, not a crash
            return Detection(False, f"openvino.Core() failed: {type(e).__name__}: {e}")
        version = getattr(ov, "__version__", "?").split("-")[0]
        if not any(d.split(".")[0] == "CPU" for d in devices):
            return Detection(False, f"OpenVINO {version} has no CPU device "
                                    f"(devices: {', '.join(devices) or 'none'})")
        if not hasattr(getattr(ov, "op", None), "_PagedAttentionExtension"):
            return Detection(False, f"OpenVINO {version} has no PagedAttention operation "
                                    "(heron needs openvino>=2026.4)")
        return Detection(True, f"OpenVINO {version}, devices {', '.join(devices)}")

    def validate(self, config: "EngineConfig") -> list[str]:
        """The base checks, plus the OpenVINO device: heron's cache layout (blocks of 32) is
        the CPU device's, the only one it has been run on; and no draft model."""
        reasons = super().validate(config)
        if self.options.device.split(".")[0] != "CPU":
            reasons.append(f"OpenVINO device {self.options.device!r} is not supported by heron's "
                           "openvino platform yet (only CPU); unset HERON_OPENVINO_DEVICE")
        spec = config.speculative
        if spec is not None and spec.method == "draft_model":
            # Proposals are verified by the shared step code (n-gram works); a draft model
            # would need a second compiled model and cache, which this runner lacks.
            reasons.append("speculative decoding with a draft model is not supported on openvino; "
                           "use method 'ngram' or device='cpu'")
        return reasons

    def attention_backend(self, dtype: "torch.dtype", head_size: int) -> type["AttentionBackend"]:
        """The backend models are traced with; OpenVINO's PagedAttention computes it."""
        from heron.kernels.openvino_attention import OpenVinoTracingAttention
        return OpenVinoTracingAttention

    def memory_info(self) -> MemoryInfo:
        return host_memory_info()

    def kv_cache_bytes(self, config: "EngineConfig", profile: MemoryProfile) -> int:
        """HERON_OPENVINO_KVCACHE_SPACE GiB (default 4), unless kv_cache_memory_bytes is given."""
        if config.cache.kv_cache_memory_bytes is not None:
            return config.cache.kv_cache_memory_bytes
        return int(self.options.kv_cache_space_gib * 2**30)

    def make_model_runner(self, config: "EngineConfig", model_path: str,
                          group: "TensorParallelGroup") -> object:
        """OpenVINO's runner: the converted model, one inference per step (one rank only:
        `capabilities.tensor_parallel` is False)."""
        from heron.platforms.openvino.runner import OpenVinoModelRunner
        return OpenVinoModelRunner(config, self.options, model_path)
