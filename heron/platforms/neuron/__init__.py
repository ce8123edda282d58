"""The built-in `neuron` platform plugin (entry point ``neuron`` in heron's own pyproject)."""
from __future__ import annotations

from typing import TYPE_CHECKING, Callable

from heron.platforms.hookspecs import hookimpl
from heron.platforms.neuron.platform import NeuronPlatform

if TYPE_CHECKING:
    from heron.platforms.interface import Platform


@hookimpl
def register_platforms(register: Callable[["Platform"], None]) -> None:
    register(NeuronPlatform())
