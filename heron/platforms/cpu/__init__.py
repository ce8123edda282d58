"""The built-in `cpu` platform plugin (entry point ``cpu`` in heron's own pyproject)."""
from __future__ import annotations

from typing import TYPE_CHECKING, Callable

from heron.platforms.cpu.platform import CpuPlatform
from heron.platforms.hookspecs import hookimpl

if TYPE_CHECKING:
    from heron.kernels.interface import AttentionBackend
    from heron.platforms.interface import Platform


@hookimpl
def register_platforms(register: Callable[["Platform"], None]) -> None:
    register(CpuPlatform())


@hookimpl
def register_attention_backends(register: Callable[[str, type["AttentionBackend"]], None]) -> None:
    from heron.kernels.cpu import CpuAttention  # torch is loaded by now; the C kernel builds lazily
    register(CpuAttention.name, CpuAttention)
