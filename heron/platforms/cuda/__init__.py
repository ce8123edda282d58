"""The built-in `cuda` platform plugin (entry point ``cuda`` in heron's own pyproject)."""
from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from heron.platforms.cuda.platform import CudaPlatform
from heron.platforms.hookspecs import hookimpl

if TYPE_CHECKING:
    from heron.kernels.interface import AttentionBackend
    from heron.platforms.interface import Platform


@hookimpl
def register_platforms(register: Callable[[Platform], None]) -> None:
    register(CudaPlatform())


@hookimpl
def register_attention_backends(register: Callable[[str, type[AttentionBackend]], None]) -> None:
    # Importing the backend imports no triton: that waits for its first forward pass.
    from heron.kernels.triton_attention import TritonAttention
    register(TritonAttention.name, TritonAttention)
