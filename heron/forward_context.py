"""The typed context a model reads during one forward pass.

The model runner sets it around `model(...)`; attention layers read their
backend, their layer's KV cache and the step's metadata from it. Model files
therefore import no device API and know nothing of paging.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import torch

from heron.kernels.interface import AttentionBackend, AttentionMetadata


@dataclass
class ForwardContext:
    attn_metadata: AttentionMetadata
    kv_caches: list[torch.Tensor]      # one tensor per attention layer
    backend: AttentionBackend


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
