"""The built-in `cpu` platform plugin."""
from __future__ import annotations

from typing import Callable

from heron.platforms.cpu.platform import CpuPlatform
from heron.platforms.hookspecs import hookimpl


@hookimpl
def register_platforms(register: Callable[[object], None]) -> None:
    register(CpuPlatform())
