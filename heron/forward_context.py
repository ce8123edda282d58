"""The typed context a model reads during one forward pass.

The model runner sets it around `model(...)`; attention layers read their
backend, their layer's KV cache and the step's metadata from it. Model files
therefore import no device API and know nothing of paging.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator

import torch

from heron.kernels.interface import AttentionBackend, AttentionMetadata
from heron.kernels.layer_ops import LayerOps

_NO_FAST_PATHS = LayerOps()


@dataclass
class ForwardContext:
    attn_metadata: AttentionMetadata
    kv_caches: list[torch.Tensor]      # one tensor per attention layer
    backend: AttentionBackend
    layer_ops: LayerOps = field(default_factory=LayerOps)  # the platform's fused element-wise ops


_current: ForwardContext | None = None


@contextmanager
def set_forward_context(ctx: ForwardContext) -> Iterator[None]:
    global _current
    previous, _current = _current, ctx
    try:
        yield
    finally:
        _current = previous


def get_forward_context() -> ForwardContext:
    if _current is None:
        raise RuntimeError("no forward context: models run inside set_forward_context(...)")
    return _current


def current_layer_ops() -> LayerOps:
    """The fused ops of the running forward pass; outside one, the plain-torch default."""
    return _current.layer_ops if _current is not None else _NO_FAST_PATHS
