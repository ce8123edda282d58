"""Prepacked linear layers for the cpu platform.

oneDNN reorders a bfloat16 weight into its blocked layout on every plain
`F.linear` call; packing each weight once after loading removes that pass over
all weights per step (measured here: about a quarter of a 64-sequence decode
step's matmul time). The products are the same oneDNN kernels: outputs match
`F.linear` exactly.
"""
from __future__ import annotations

import torch
from torch import nn

from heron.logger import get_logger

logger = get_logger(__name__)

# Batch size the blocked layout is tuned for: decode batches are tens of rows.
_PACK_HINT = 64


def packing_available(dtype: torch.dtype) -> bool:
    """Whether this torch build can prepack weights of `dtype` (bfloat16 only, by choice:
    float32 stays on the plain path that the equivalence tests compare with HF)."""
    if dtype != torch.bfloat16 or not torch.backends.mkldnn.is_available():
        return False
    try:
        torch.ops.mkldnn._reorder_linear_weight
        torch.ops.mkldnn._linear_pointwise
        # oneDNN's bf16 reorder needs AVX-512 (or AVX-NE-CONVERT); AVX2-only CPUs refuse it.
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


class PackedLinear(nn.Module):
    """y = x @ W^T + b with W kept in oneDNN's blocked layout."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.in_features = weight.shape[1]
        self.out_features = weight.shape[0]
        self.packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous(),
                                                              _PACK_HINT)
        self.bias = None if bias is None else bias.detach().clone()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, packed"


def pack_linear_layers(model: nn.Module) -> int:
    """Replace every bfloat16 nn.Linear of `model` by a PackedLinear; also give a model with
    tied embeddings a packed `lm_head` (a copy: the embedding table stays for lookups).
    Returns the number of layers packed."""
    count = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear) and child.weight.dtype == torch.bfloat16:
                setattr(parent, name, PackedLinear(child.weight, child.bias))
                count += 1
    embed = getattr(getattr(model, "model", None), "embed_tokens", None)
    if getattr(model, "lm_head", "absent") is None and isinstance(embed, nn.Embedding) \
            and embed.weight.dtype == torch.bfloat16:
        model.lm_head = PackedLinear(embed.weight, None)
        count += 1
    logger.info("prepacked %d linear layers for oneDNN", count)
    return count
