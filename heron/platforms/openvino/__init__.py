"""The built-in `openvino` platform plugin (entry point ``openvino`` in heron's own pyproject)."""
from __future__ import annotations

from typing import TYPE_CHECKING, Callable

from heron.platforms.hookspecs import hookimpl
from heron.platforms.openvino.platform import OpenVinoPlatform

if TYPE_CHECKING:
    from heron.platforms.interface import Platform


@hookimpl
def register_platforms(register: Callable[["Platform"], None]) -> None:
    register(OpenVinoPlatform())
