"""A model's forward pass on its platform: the platform's compiled forward when it offers
one (`Platform.compiled_forward`), else the model's layers from Python. Shared by the
model runner and the draft model of speculative decoding."""
from __future__ import annotations

import torch

from heron.forward_context import ForwardContext, set_forward_context
from heron.kernels.interface import AttentionBackend, AttentionMetadata, CompiledForward
from heron.kernels.layer_ops import LayerOps
from heron.platforms.interface import Platform


def choose_compiled_forward(platform: Platform, model: torch.nn.Module,
                            backend: AttentionBackend, dtype: torch.dtype,
                            enforce_eager: bool) -> CompiledForward | None:
    """The platform's compiled forward for this one-rank model, unless `enforce_eager` or
    the platform declares no graph capture."""
    if enforce_eager or not platform.capabilities.graph_capture:
        return None
    return platform.compiled_forward(model, backend, dtype)


def forward_pass(compiled: CompiledForward | None, model: torch.nn.Module,
                 input_ids: torch.Tensor, meta: AttentionMetadata,
                 kv_caches: list[torch.Tensor], backend: AttentionBackend,
                 layer_ops: LayerOps) -> torch.Tensor:
    """Final hidden states of one step: compiled when there is a compiled forward and it
    takes this call, else eager under the step's forward context."""
    if compiled is not None:
        hidden = compiled(input_ids, meta, kv_caches)
        if hidden is not None:
            return hidden
    with set_forward_context(ForwardContext(meta, kv_caches, backend, layer_ops)):
        return model(input_ids, meta.positions)
