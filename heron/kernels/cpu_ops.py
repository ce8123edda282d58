"""The cpu platform's fused layer ops (csrc/cpu_ops.c), through ctypes.

Used for bfloat16 and float32 CPU tensors whose rows are contiguous; anything
else returns None / False and the model takes its plain torch path.
"""
from __future__ import annotations

import ctypes
import functools
from pathlib import Path

import torch

from heron.kernels import cbuild
from heron.kernels.layer_ops import LayerOps
from heron.logger import get_logger

logger = get_logger(__name__)

_SOURCE = Path(__file__).parent / "csrc" / "cpu_ops.c"
_DTYPES = {torch.float32: 0, torch.bfloat16: 1}


def _declare(lib: ctypes.CDLL) -> None:
    i64, i32, ptr, f32 = ctypes.c_int64, ctypes.c_int, ctypes.c_void_p, ctypes.c_float
    lib.heron_add_rms_norm.argtypes = [ptr, i64, ptr, i64, ptr, ptr, i64, i64, i64, f32, i32, i32]
    lib.heron_rotary.argtypes = [ptr, i64, i64, i64, i64, ptr, ptr, i32, i32]
    lib.heron_silu_and_mul.argtypes = [ptr, i64, ptr, i64, i64, i64, i32, i32]
    for fn in (lib.heron_add_rms_norm, lib.heron_rotary, lib.heron_silu_and_mul):
        fn.restype = None


@functools.lru_cache(maxsize=None)
def load_ops() -> "CpuLayerOps | None":
    """The fused ops, or None (with one warning) when the C file cannot be built here."""
    lib, why = cbuild.load_library(_SOURCE, _declare)
    if lib is None:
        logger.warning("cpu layer ops unavailable, using plain torch: %s", why)
        return None
    return CpuLayerOps(lib)


def _rows_ok(t: torch.Tensor, dtype: torch.dtype) -> bool:
    """A CPU tensor of `dtype` whose last dim is contiguous and whose rows are evenly strided."""
    return (t.device.type == "cpu" and t.dtype == dtype and t.dim() == 2 and t.stride(1) == 1)


class CpuLayerOps(LayerOps):
    def __init__(self, lib: ctypes.CDLL) -> None:
        self._lib = lib
        self._checked_positions: torch.Tensor | None = None

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float,
                 residual: torch.Tensor | None) -> torch.Tensor | None:
        dt = _DTYPES.get(x.dtype)
        if dt is None or not _rows_ok(x, x.dtype) or weight.dtype != x.dtype \
                or not weight.is_contiguous() or (residual is not None and not _rows_ok(residual, x.dtype)):
            return None
        rows, hidden = x.shape
        out = torch.empty((rows, hidden), dtype=x.dtype)
        self._lib.heron_add_rms_norm(
            x.data_ptr(), x.stride(0), residual.data_ptr() if residual is not None else None,
            residual.stride(0) if residual is not None else 0, weight.data_ptr(), out.data_ptr(),
            hidden, rows, hidden, eps, dt, torch.get_num_threads())
        return out

    def rotary_(self, x: torch.Tensor, positions: torch.Tensor,
                cos_sin_cache: torch.Tensor) -> bool:
        dt = _DTYPES.get(x.dtype)
        if (dt is None or x.device.type != "cpu" or x.dim() != 3 or x.stride(2) != 1
                or x.stride(1) != x.shape[2] or cos_sin_cache.dtype != x.dtype
                or not cos_sin_cache.is_contiguous() or cos_sin_cache.shape[1] != x.shape[2]
                or positions.dtype != torch.int64 or not positions.is_contiguous()):
            return False
        rows, heads, head_dim = x.shape
        # Every layer of a step passes the same positions: bound-check them once.
        if rows and positions is not self._checked_positions:
            if int(positions.max()) >= cos_sin_cache.shape[0]:
                raise ValueError(f"position {int(positions.max())} is past the rotary cache "
                                 f"({cos_sin_cache.shape[0]} positions)")
            self._checked_positions = positions
        self._lib.heron_rotary(x.data_ptr(), x.stride(0), rows, heads, head_dim,
                               positions.data_ptr(), cos_sin_cache.data_ptr(), dt,
                               torch.get_num_threads())
        return True

    def silu_and_mul(self, x: torch.Tensor) -> torch.Tensor | None:
        dt = _DTYPES.get(x.dtype)
        if dt is None or not _rows_ok(x, x.dtype):
            return None
        rows, d = x.shape[0], x.shape[1] // 2
        out = torch.empty((rows, d), dtype=x.dtype)
        self._lib.heron_silu_and_mul(x.data_ptr(), x.stride(0), out.data_ptr(), d, rows, d, dt,
                                     torch.get_num_threads())
        return out
