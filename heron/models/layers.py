"""Backend-neutral building blocks of decoder-only transformers.

Nothing here imports a device API: attention goes through the backend found in
the forward context, everything else is plain torch that runs anywhere. The
numerics follow Hugging Face transformers op for op, so that a model built from
these layers is greedy-identical to the reference implementation.
"""
from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from heron.forward_context import current_layer_ops, get_forward_context


class RMSNorm(nn.Module):
    """Root-mean-square norm computed in float32, then cast back, as HF LlamaRMSNorm."""

    def __init__(self, hidden_size: int, eps: float, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size, dtype=dtype))
        self.eps = eps
        self.hidden_size = hidden_size

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None
                ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """norm(x), or with `residual`: (norm(x + residual), x + residual), the sum made in
        the input dtype as HF's `hidden = residual + hidden` is."""
        fused = current_layer_ops().rms_norm(x, self.weight, self.eps, residual)
        if fused is not None:
            return fused if residual is None else (fused, residual)
        if residual is not None:
            residual = x + residual
            x = residual
        # F.rms_norm on a float32 input is bit-identical to HF's
        # `x * rsqrt(mean(x^2) + eps)` (checked on fp32 and bf16 inputs) and is
        # one fused op instead of five, which matters on CPU. Like HF, the weight
        # multiplies after the cast back to the input dtype.
        normed = F.rms_norm(x.float(), (self.hidden_size,), eps=self.eps)
        out = self.weight * normed.to(x.dtype)
        return out if residual is None else (out, residual)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """SwiGLU activation on a fused [..., 2 * d] gate|up projection: silu(gate) * up."""
    fused = current_layer_ops().silu_and_mul(x)
    if fused is not None:
        return fused
    d = x.shape[-1] // 2
    return F.silu(x[..., :d]) * x[..., d:]


def rope_parameters(hf_config: Any) -> dict[str, Any]:
    """RoPE settings as one dict with at least `rope_type` and `rope_theta`.

    transformers 5.x keeps them in `config.rope_parameters`; 4.x splits them into
    `config.rope_theta` and an optional `config.rope_scaling` (whose type key was
    once named `type`).
    """
    params = getattr(hf_config, "rope_parameters", None)
    if not params:
        params = dict(getattr(hf_config, "rope_scaling", None) or {})
        params.setdefault("rope_theta", getattr(hf_config, "rope_theta", 10000.0))
    params = dict(params)
    params["rope_type"] = params.get("rope_type") or params.get("type") or "default"
    return params


def rope_inv_freq(head_dim: int, params: dict[str, Any]) -> torch.Tensor:
    """Inverse frequencies [head_dim // 2] in float32 for `default`, `linear` and `llama3` rope."""
    base = float(params["rope_theta"])
    # Same expression as HF so that the float32 values are identical. Explicitly on
    # the CPU: the model may be constructed under a `torch.device("meta")` context.
    steps = torch.arange(0, head_dim, 2, dtype=torch.int64, device="cpu").float()
    inv_freq = 1.0 / (base ** (steps / head_dim))
    rope_type = params["rope_type"]
    if rope_type == "default":
        return inv_freq
    if rope_type == "linear":
        return inv_freq / float(params["factor"])
    if rope_type == "llama3":
        return _llama3_inv_freq(inv_freq, params)
    raise ValueError(f"unsupported rope type {rope_type!r}: heron supports default, linear and llama3")


def _llama3_inv_freq(inv_freq: torch.Tensor, params: dict[str, Any]) -> torch.Tensor:
    """Llama 3.1 frequency scaling: long wavelengths divided by `factor`, a smooth ramp between."""
    factor = float(params["factor"])
    low_freq_factor = float(params["low_freq_factor"])
    high_freq_factor = float(params["high_freq_factor"])
    old_context_len = params["original_max_position_embeddings"]
    low_freq_wavelen = old_context_len / low_freq_factor
    high_freq_wavelen = old_context_len / high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


class RotaryEmbedding(nn.Module):
    """Neox-style rotary embedding (HF Llama's rotate-half) from a cos/sin cache.

    The cache holds `[max_positions, head_dim]` = cos | sin over half the head
    (the two halves of HF's `cat((freqs, freqs))` are equal), computed in
    float32 and stored in the model dtype, because HF casts cos/sin to the
    activation dtype before applying them. It is built lazily on the device of
    the first `positions` seen, so a model constructed on the meta device and
    materialised later needs no extra step.
    """

    def __init__(self, head_dim: int, max_positions: int, params: dict[str, Any],
                 dtype: torch.dtype) -> None:
        super().__init__()
        self.head_dim = head_dim
        self.max_positions = max_positions
        self.dtype = dtype
        # Plain attributes, not buffers: they are derived from the config, never
        # loaded, and must survive `to_empty()`.
        self.inv_freq = rope_inv_freq(head_dim, params)
        self._cache: torch.Tensor | None = None

    def _build_cache(self, device: torch.device) -> torch.Tensor:
        positions = torch.arange(self.max_positions, dtype=torch.int64, device="cpu").float()
        freqs = positions[:, None] * self.inv_freq[None, :]   # elementwise, exactly as HF
        cache = torch.cat((freqs.cos(), freqs.sin()), dim=-1).to(self.dtype)
        return cache.to(device)

    def cache(self, device: torch.device) -> torch.Tensor:
        """The [max_positions, head_dim] cos|sin table on `device`."""
        if self._cache is None or self._cache.device != device:
            self._cache = self._build_cache(device)
        return self._cache

    def forward(self, positions: torch.Tensor) -> "RotaryInputs":
        """What every layer of one forward pass needs to rotate its q and k."""
        return RotaryInputs(positions, self.cache(positions.device))


class RotaryInputs:
    """Positions of one forward pass and the cos|sin table; cos/sin per token are
    gathered once, on first use by the torch path, and shared by every layer."""

    def __init__(self, positions: torch.Tensor, table: torch.Tensor) -> None:
        self.positions = positions
        self.table = table
        self._cos_sin: tuple[torch.Tensor, torch.Tensor] | None = None

    def cos_sin(self) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin, each [T, 1, head_dim // 2], ready to broadcast over heads."""
        if self._cos_sin is None:
            cos, sin = self.table[self.positions].unsqueeze(1).chunk(2, dim=-1)
            self._cos_sin = (cos, sin)
        return self._cos_sin

    def rotate(self, x: torch.Tensor) -> torch.Tensor:
        """x [T, heads, head_dim] rotated by position: in place when the platform's fused
        op takes it, else a new tensor."""
        if current_layer_ops().rotary_(x, self.positions, self.table):
            return x
        return apply_rotary(x, *self.cos_sin())


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [T, heads, head_dim] by position: `x * cos + rotate_half(x) * sin`.

    Written on halves, which gives bit-identical results to HF's form
    (`a + (-b)` equals `a - b` in floating point) with fewer ops.
    """
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


class Attention(nn.Module):
    """Paged attention of one layer through the backend of the current forward context."""

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, layer_idx: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.scale = head_dim ** -0.5
        self.layer_idx = layer_idx

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q [T, heads, head_dim], k/v [T, kv_heads, head_dim] -> [T, heads, head_dim]."""
        ctx = get_forward_context()
        return ctx.backend.forward(q, k, v, ctx.kv_caches[self.layer_idx], ctx.attn_metadata)
