"""The xla platform: Google TPUs through torch_xla (PJRT).

Detection only for now; execution lands in its own issue. A TPU VM exposes its
chips as /dev/accel* (v2-v4) or /dev/vfio/* (v5e and later); PJRT_DEVICE set by
hand (e.g. to CPU) also counts, for running XLA without a TPU.
"""
from __future__ import annotations

import os

from heron.platforms.interface import Detection
from heron.platforms.pending import PendingPlatform
from heron.platforms.probes import device_files, module_installed, try_import

TPU_GLOBS = ("/dev/accel[0-9]*", "/dev/vfio/[0-9]*")


class XlaPlatform(PendingPlatform):
    name = "xla"
    device_type = "xla"
    priority = 30
    distributed_backend = "xla"
    missing = "XLA execution path (torch_xla model runner, Pallas attention)"

    def detect(self) -> Detection:
        chips = device_files(*TPU_GLOBS)
        pjrt = os.environ.get("PJRT_DEVICE")
        problems = []
        if not chips and not pjrt:
            problems.append("no TPU (no /dev/accel* or /dev/vfio/*, and PJRT_DEVICE is unset)")
        if not module_installed("torch_xla"):
            problems.append("torch_xla is not installed")
        if problems:
            return Detection(False, "; ".join(problems))
        torch_xla, error = try_import("torch_xla")
        if torch_xla is None:
            return Detection(False, f"torch_xla does not import: {error}")
        where = f"PJRT_DEVICE={pjrt}" if pjrt else f"{len(chips)} TPU device file(s)"
        return self.available(f"{where}, torch_xla {getattr(torch_xla, '__version__', '?')}")
