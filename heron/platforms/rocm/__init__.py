"""The built-in `rocm` platform plugin (entry point ``rocm`` in heron's own pyproject)."""
from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from heron.platforms.hookspecs import hookimpl
from heron.platforms.rocm.platform import RocmPlatform

if TYPE_CHECKING:
    from heron.kernels.interface import AttentionBackend
    from heron.platforms.interface import Platform


@hookimpl
def register_platforms(register: Callable[[Platform], None]) -> None:
    register(RocmPlatform())


@hookimpl
def register_attention_backends(register: Callable[[str, type[AttentionBackend]], None]) -> None:
    # Importing the backend imports no triton: that waits for its first forward pass.
    from heron.kernels.triton_attention import TritonAttention
    register(TritonAttention.name, TritonAttention)
