"""Cheap probes for `Platform.detect()`: device files, package builds, host memory.

Nothing here imports torch or a device SDK. The torch build is read from the
installed distribution's version string (``2.13.0+cpu``, ``2.5.1+rocm6.2``), which
costs a file read instead of the second or more an ``import torch`` takes.
"""
from __future__ import annotations

import glob
import importlib.util
import os
import sys
from dataclasses import dataclass
from importlib import metadata

from heron.platforms.interface import MemoryInfo


@dataclass(frozen=True)
class TorchBuild:
    """Which torch is installed: its version and the accelerator it was built for.

    `kind` is "cpu", "cuda", "rocm", "xpu", "unknown" (a local build whose version does
    not say), or None when torch is not installed.
    A version without a local suffix (the default PyPI wheels on Linux) is a CUDA build.
    """
    version: str | None
    kind: str | None


def torch_build() -> TorchBuild:
    """The installed torch's build, without importing it (unless it is imported already)."""
    torch = sys.modules.get("torch")
    if torch is not None and hasattr(torch, "version"):
        if getattr(torch.version, "hip", None):
            return TorchBuild(torch.__version__, "rocm")
        if getattr(torch.version, "cuda", None):
            return TorchBuild(torch.__version__, "cuda")
    try:
        return build_from_version(metadata.version("torch"))
    except metadata.PackageNotFoundError:
        return TorchBuild(None, None)


def build_from_version(version: str) -> TorchBuild:
    """What a torch version string says about its build ("2.13.0+cpu" -> cpu)."""
    local = version.partition("+")[2]
    if local.startswith("cpu"):
        return TorchBuild(version, "cpu")
    if local.startswith("rocm"):
        return TorchBuild(version, "rocm")
    if local.startswith("xpu"):
        return TorchBuild(version, "xpu")
    # "+cu124", or no suffix: the PyPI Linux wheel, built for CUDA. macOS/Windows
    # wheels without suffix are CPU builds.
    if local.startswith("cu") or (not local and sys.platform.startswith("linux")):
        return TorchBuild(version, "cuda")
    if not local:
        return TorchBuild(version, "cpu")
    return TorchBuild(version, "unknown")  # a source build ("+git1a2b3c"): import to know


def device_files(*patterns: str) -> list[str]:
    """Existing paths matching any of the glob patterns, sorted (e.g. "/dev/nvidia[0-9]*")."""
    found: set[str] = set()
    for pattern in patterns:
        found.update(glob.glob(pattern))
    return sorted(found)


def module_installed(name: str) -> bool:
    """Whether a top-level module can be found, without importing (or executing) it."""
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def try_import(name: str) -> tuple[object | None, str | None]:
    """Import a module; return (module, None) or (None, "ExcType: message").

    Catches every Exception, not just ImportError: placeholder packages on PyPI raise
    ImportError (or worse) on import, and a broken SDK must not break detection."""
    try:
        return importlib.import_module(name), None
    except Exception as e:  # noqa: BLE001 - any failure means "not usable", with why
        return None, f"{type(e).__name__}: {e}"


def env_hides_devices(var: str) -> bool:
    """True when a visibility variable (CUDA_VISIBLE_DEVICES, ...) is set to hide every device."""
    value = os.environ.get(var)
    return value is not None and value.strip() in ("", "-1")


def host_memory_info() -> MemoryInfo:
    """Total and available host memory from /proc/meminfo (zeros where it cannot be read)."""
    values: dict[str, int] = {}
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                key, rest = line.split(":", 1)
                values[key] = int(rest.split()[0]) * 1024
        return MemoryInfo(values["MemTotal"], values.get("MemAvailable", values["MemFree"]))
    except (OSError, KeyError, ValueError, IndexError):
        return MemoryInfo(0, 0)
