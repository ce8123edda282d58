"""The openvino platform: Intel CPUs, GPUs and NPUs through the OpenVINO runtime.

Detection only for now; execution (a model compiled by OpenVINO with paged
attention) lands in its own issue. Until then choosing it is a clear error.
"""
from __future__ import annotations

from heron.platforms.interface import Detection
from heron.platforms.pending import PendingPlatform
from heron.platforms.probes import module_installed, try_import


class OpenVinoPlatform(PendingPlatform):
    name = "openvino"
    device_type = "cpu"   # OpenVINO takes host tensors; it places work on its own devices
    priority = 10         # above cpu: installing openvino asks for it on the same host
    missing = "OpenVINO execution path (model compilation, paged attention)"

    def detect(self) -> Detection:
        # There is no device file to probe: OpenVINO's devices are enumerated by its
        # runtime, which is only imported when the package is there at all.
        if not module_installed("openvino"):
            return Detection(False, "openvino is not installed (pip install openvino)")
        ov, error = try_import("openvino")
        if ov is None:
            return Detection(False, f"openvino does not import: {error}")
        try:
            devices = [str(d) for d in ov.Core().available_devices]  # type: ignore[attr-defined]
        except Exception as e:  # noqa: BLE001 - a broken runtime is a reason, not a crash
            return Detection(False, f"openvino.Core() failed: {type(e).__name__}: {e}")
        version = getattr(ov, "__version__", "?")
        if not any(d.split(".")[0] == "CPU" for d in devices):
            return Detection(False, f"OpenVINO {version} has no CPU device "
                                    f"(devices: {', '.join(devices) or 'none'})")
        return self.available(f"OpenVINO {version}, devices {', '.join(devices)}")
