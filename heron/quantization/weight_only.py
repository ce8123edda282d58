"""Weight-only quantization of ordinary checkpoints: `quantization="int8"` or `"int4"`.

- int8: symmetric, one float32 scale per output channel (row): w = scale * q, q in
  -127..127. Row bytes: the scale, then K int8 values.
- int4: asymmetric, one float32 scale and offset per group of 32 input features:
  w = scale * q + offset, q in 0..15 (round to nearest). Row bytes per group: scale,
  offset, then 16 bytes with value j in the low nibble of byte j and value j + 16 in
  its high nibble (GGUF's Q4_1 packing).

Weights are quantized once after loading, from the checkpoint's values in float32.
Every linear layer is quantized, the head included (a tied head gets its own quantized
copy; the embedding table stays as it is for lookups).
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from heron.logger import get_logger
from heron.quantization.linear import QuantizedLinear
from heron.quantization.tensor import QuantizedTensor

logger = get_logger(__name__)

METHODS = ("int8", "int4")
GROUP = 32


def quantize_int8(weight: torch.Tensor, name: str = "") -> QuantizedTensor:
    """Per-channel symmetric int8 of a [N, K] weight."""
    w = weight.detach().float().numpy()
    scale = np.abs(w).max(axis=1) / 127.0
    safe = np.where(scale > 0, scale, 1.0).astype(np.float32)
    q = np.clip(np.rint(w / safe[:, None]), -127, 127).astype(np.int8)
    data = np.concatenate([scale.astype(np.float32)[:, None].view(np.uint8), q.view(np.uint8)],
                          axis=1)
    return QuantizedTensor("int8", tuple(w.shape), torch.from_numpy(data), name)


def quantize_int4(weight: torch.Tensor, name: str = "") -> QuantizedTensor:
    """Asymmetric int4 in groups of 32 of a [N, K] weight (K a multiple of 32)."""
    w = weight.detach().float().numpy()
    n, k = w.shape
    if k % GROUP:
        raise ValueError(f"{name}: int4 needs in_features divisible by {GROUP}, got {k}")
    g = w.reshape(n, k // GROUP, GROUP)
    lo, hi = g.min(axis=2), g.max(axis=2)
    scale = ((hi - lo) / 15.0).astype(np.float32)
    safe = np.where(scale > 0, scale, 1.0)
    q = np.clip(np.rint((g - lo[..., None]) / safe[..., None]), 0, 15).astype(np.uint8)
    packed = q[..., :16] | (q[..., 16:] << 4)
    data = np.concatenate([scale[..., None].view(np.uint8).reshape(n, -1, 4),
                           lo.astype(np.float32)[..., None].view(np.uint8).reshape(n, -1, 4),
                           packed], axis=2).reshape(n, -1)
    return QuantizedTensor("int4", (n, k), torch.from_numpy(np.ascontiguousarray(data)), name)


def split_int8(data: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(q int8 [N, K], scale float32 [N]) from int8 rows."""
    scale = np.ascontiguousarray(data[:, :4]).view(np.float32)[:, 0]
    return np.ascontiguousarray(data[:, 4:4 + k]).view(np.int8), scale


def split_int4(data: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(q uint8 [N, K] in 0..15, scale [N, K/32], offset [N, K/32]) from int4 rows."""
    n = data.shape[0]
    g = data.reshape(n, k // GROUP, 24)
    scale = np.ascontiguousarray(g[..., 0:4]).view(np.float32)[..., 0]
    offset = np.ascontiguousarray(g[..., 4:8]).view(np.float32)[..., 0]
    qs = g[..., 8:]
    q = np.concatenate([qs & 15, qs >> 4], axis=-1).reshape(n, k)
    return q, scale, offset


def dequantize_weight_only(qtype: str, data: np.ndarray, k: int) -> np.ndarray:
    """float32 [N, K] from int8 or int4 rows."""
    if qtype == "int8":
        q, scale = split_int8(data, k)
        return q.astype(np.float32) * scale[:, None]
    q, scale, offset = split_int4(data, k)
    n = data.shape[0]
    w = q.reshape(n, k // GROUP, GROUP).astype(np.float32) * scale[..., None] + offset[..., None]
    return w.reshape(n, k)


def quantize_model(model: nn.Module, method: str, dtype: torch.dtype) -> int:
    """Replace every nn.Linear of `model` (and a tied head) by a QuantizedLinear in
    `method`; layers whose input features do not divide into groups stay dense.
    Returns the number quantized."""
    if method not in METHODS:
        raise ValueError(f"unknown quantization {method!r}: heron quantizes checkpoints with "
                         f"{' or '.join(METHODS)} (GGUF files keep their own formats)")
    quantize = quantize_int8 if method == "int8" else quantize_int4
    count = skipped = 0
    for parent_name, parent in list(model.named_modules()):
        for name, child in list(parent.named_children()):
            if not isinstance(child, nn.Linear):
                continue
            if child.in_features % GROUP:
                skipped += 1
                continue
            full = f"{parent_name}.{name}" if parent_name else name
            layer = QuantizedLinear(child.in_features, child.out_features, child.bias, dtype)
            layer.set_part(0, quantize(child.weight, full))
            setattr(parent, name, layer)
            count += 1
    embed = getattr(getattr(model, "model", None), "embed_tokens", None)
    if getattr(model, "lm_head", "absent") is None and isinstance(embed, nn.Embedding) \
            and embed.weight.shape[1] % GROUP == 0:
        head = QuantizedLinear(embed.weight.shape[1], embed.weight.shape[0], None, dtype)
        head.set_part(0, quantize(embed.weight, "lm_head"))
        model.lm_head = head
        count += 1
    logger.info("%d linear layers quantized to %s%s", count, method,
                f" ({skipped} left dense: in_features not a multiple of {GROUP})"
                if skipped else "")
    return count
