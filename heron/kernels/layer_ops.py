"""Fast paths a platform may offer for the element-wise parts of a decoder layer.

Model layers (heron/models/layers.py) ask the forward context's `LayerOps` first
and fall back to plain torch when it returns None, so a platform can speed up
RMSNorm, rotary embedding and SiLU-and-mul without model files knowing about it.
Every fast path must compute what the torch path computes.
"""
from __future__ import annotations

import torch


class LayerOps:
    """The default: nothing fused, every call returns None (use the torch path)."""

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float,
                 residual: torch.Tensor | None) -> torch.Tensor | None:
        """weight * rms_norm(x + residual); the sum is stored into `residual` in place."""
        return None

    def rotary_(self, x: torch.Tensor, positions: torch.Tensor,
                cos_sin_cache: torch.Tensor) -> bool:
        """Rotate x [T, heads, head_dim] in place; the cache is [max_pos, head_dim] = cos|sin.
        Returns False when not handled."""
        return False

    def silu_and_mul(self, x: torch.Tensor) -> torch.Tensor | None:
        """silu(x[..., :d]) * x[..., d:]."""
        return None
