"""One quantized weight matrix: format name, logical shape, raw block bytes per row."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

class UnsupportedQuantType(ValueError):
    """A tensor's format cannot be read; the message names the tensor and the type."""


@dataclass
class QuantizedTensor:
    """A weight [out_features, in_features] whose rows are stored as `qtype` blocks.

    `data` is uint8 [out_features, row_bytes]: each row's blocks exactly as the format
    lays them out (for GGUF types, the file's bytes), so rows can be sliced, permuted
    and concatenated without decoding. `name` is the tensor's name in its source, for
    error messages."""
    qtype: str
    shape: tuple[int, int]
    data: torch.Tensor
    name: str = ""

    def __post_init__(self) -> None:
        if self.data.dtype != torch.uint8 or self.data.dim() != 2 \
                or self.data.shape[0] != self.shape[0]:
            raise ValueError(f"{self.name or 'quantized tensor'} ({self.qtype}): data must be "
                             f"uint8 [{self.shape[0]}, row_bytes], got {self.data.dtype} "
                             f"{tuple(self.data.shape)}")

    @property
    def out_features(self) -> int:
        return self.shape[0]

    @property
    def in_features(self) -> int:
        return self.shape[1]

    def rows(self, index: slice | torch.Tensor) -> "QuantizedTensor":
        """The tensor made of some of its rows (a slice or an index tensor)."""
        data = self.data[index]
        return QuantizedTensor(self.qtype, (data.shape[0], self.shape[1]), data, self.name)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The dense weight [out_features, in_features] in `dtype` (float32 arithmetic)."""
        return torch.from_numpy(dequantize_rows(self.qtype, self.data.numpy(), self.shape[1],
                                                self.name)).to(dtype)

    def nbytes(self) -> int:
        return self.data.numel()


def dequantize_rows(qtype: str, data: np.ndarray, in_features: int, name: str = "") -> np.ndarray:
    """float32 [rows, in_features] from the rows' block bytes `data` [rows, row_bytes]."""
    if qtype in ("int8", "int4"):
        from heron.quantization.weight_only import dequantize_weight_only
        return dequantize_weight_only(qtype, data, in_features)
    import gguf
    try:
        kind = gguf.GGMLQuantizationType[qtype.upper()]
    except KeyError:
        raise UnsupportedQuantType(f"tensor {name or '?'} has type {qtype}, which heron cannot "
                                   f"read") from None
    out = gguf.quants.dequantize(np.ascontiguousarray(data), kind)
    return np.asarray(out, dtype=np.float32).reshape(data.shape[0], in_features)
