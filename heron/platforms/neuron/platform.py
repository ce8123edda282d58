"""The neuron platform: AWS Inferentia and Trainium through torch-neuronx.

Detection only for now; execution lands in its own issue. The device files come
first (/dev/neuron0 ...); the package is imported only on a Neuron host, and any
exception on import counts as "not usable": the torch-neuronx name on PyPI outside
AWS's index is a placeholder whose import raises ImportError.
"""
from __future__ import annotations

from heron.platforms.interface import Detection
from heron.platforms.pending import PendingPlatform
from heron.platforms.probes import device_files, module_installed, try_import


class NeuronPlatform(PendingPlatform):
    name = "neuron"
    device_type = "xla"   # torch-neuronx runs through torch_xla's device
    priority = 30
    distributed_backend = "xla"
    missing = "Neuron execution path (torch-neuronx model runner, NKI attention)"

    def detect(self) -> Detection:
        devices = device_files("/dev/neuron[0-9]*")
        problems = []
        if not devices:
            problems.append("no AWS Neuron device (no /dev/neuron0)")
        if not module_installed("torch_neuronx"):
            problems.append("torch-neuronx is not installed")
        if problems:
            return Detection(False, "; ".join(problems))
        neuronx, error = try_import("torch_neuronx")
        if neuronx is None:
            return Detection(False, f"torch_neuronx does not import: {error}")
        return self.available(f"{len(devices)} Neuron device(s), torch-neuronx "
                              f"{getattr(neuronx, '__version__', '?')}")
