"""The built-in `cuda` platform plugin (entry point ``cuda`` in heron's own pyproject)."""
from __future__ import annotations

from typing import TYPE_CHECKING, Callable

from heron.platforms.cuda.platform import CudaPlatform
from heron.platforms.hookspecs import hookimpl

if TYPE_CHECKING:
    from heron.platforms.interface import Platform


@hookimpl
def register_platforms(register: Callable[["Platform"], None]) -> None:
    register(CudaPlatform())
