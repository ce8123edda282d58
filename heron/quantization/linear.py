"""The backend-neutral quantized linear layer and its load-time dequantization."""
from __future__ import annotations

from collections import Counter
from typing import Collection

import torch
import torch.nn.functional as F
from torch import nn

from heron.logger import get_logger
from heron.quantization.tensor import QuantizedTensor

logger = get_logger(__name__)


class QuantizedLinear(nn.Module):
    """y = x @ W^T + b with W the row-wise concatenation of quantized `parts`.

    A placeholder between the loader and a platform: `prepare_model` of a platform with
    kernels for the parts' formats replaces it with its own layer, and
    `dequantize_linears` turns what is left into plain nn.Linear layers. Its own forward
    (dequantizing on every call) exists for completeness, not for speed."""

    def __init__(self, in_features: int, out_features: int, bias: torch.Tensor | None,
                 dtype: torch.dtype, num_parts: int = 1) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.dtype = dtype
        self.parts: list[QuantizedTensor | None] = [None] * num_parts
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)

    def set_part(self, index: int, tensor: QuantizedTensor) -> None:
        """Place one part (a shard of a fused projection, in concatenation order)."""
        if tensor.in_features != self.in_features:
            raise ValueError(f"{tensor.name}: {tensor.in_features} input features, the layer "
                             f"has {self.in_features}")
        self.parts[index] = tensor

    def complete(self) -> bool:
        return all(p is not None for p in self.parts) and \
            sum(p.out_features for p in self.parts) == self.out_features

    def formats(self) -> set[str]:
        return {p.qtype for p in self.parts if p is not None}

    def dequantized_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The dense weight [out_features, in_features]."""
        return torch.cat([p.dequantize(torch.float32) for p in self.parts]).to(dtype or self.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.dequantized_weight(x.dtype), bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"formats={'+'.join(p.qtype for p in self.parts if p is not None)}")


def dequantize_linears(model: nn.Module, keep: Collection[str] = (), reason: str = "") -> int:
    """Replace every QuantizedLinear of `model` that has a format outside `keep` by an
    nn.Linear with the dequantized weight (in the layer's dtype), with a log line naming
    the formats. Returns the number of layers replaced."""
    formats: Counter[str] = Counter()
    count = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, QuantizedLinear) and not child.formats() <= set(keep):
                linear = nn.Linear(child.in_features, child.out_features,
                                   bias=child.bias is not None, dtype=child.dtype)
                linear.weight.data = child.dequantized_weight()
                if child.bias is not None:
                    linear.bias.data = child.bias.data.to(child.dtype)
                linear.requires_grad_(False)
                setattr(parent, name, linear)
                formats.update(child.formats() - set(keep))
                count += 1
    if count:
        logger.warning("%d linear layers dequantized at load time (%s has no kernel for %s)",
                       count, reason or "this platform", ", ".join(sorted(formats)))
    return count
