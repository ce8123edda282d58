"""The built-in `xla` platform plugin (entry point ``xla`` in heron's own pyproject)."""
from __future__ import annotations

from typing import TYPE_CHECKING, Callable

from heron.platforms.hookspecs import hookimpl
from heron.platforms.xla.platform import XlaPlatform

if TYPE_CHECKING:
    from heron.platforms.interface import Platform


@hookimpl
def register_platforms(register: Callable[["Platform"], None]) -> None:
    register(XlaPlatform())
