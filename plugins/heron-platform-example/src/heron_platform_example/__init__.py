"""heron-platform-example: the plugin module named by the ``heron`` entry point.

heron imports this module when it builds its plugin manager and calls the hooks
below. Keep the module import cheap: heron imports it even for ``heron platforms``,
so torch and the model code are imported inside the hooks that need them.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Callable

from heron.platforms import hookimpl

from heron_platform_example.platform import ExamplePlatform

if TYPE_CHECKING:
    from torch import nn

    from heron.platforms import Platform

__version__ = "0.1.0"


@hookimpl
def register_platforms(register: Callable[["Platform"], None]) -> None:
    register(ExamplePlatform())


@hookimpl
def register_models(register: Callable[[str, type["nn.Module"]], None]) -> None:
    from heron_platform_example.model import ExampleLlamaForCausalLM
    register("ExampleLlamaForCausalLM", ExampleLlamaForCausalLM)
