"""Quantized linear layers for the cpu platform (csrc/cpu_quant.c).

`CpuQuantLinear` runs a `QuantizedLinear` without ever making its weight dense: its
parts are repacked once, at load time, from their block formats (GGUF's Q4_0, Q4_1,
Q4_K, Q8_0, Q6_K; heron's int8 and int4) into the kernel's two layouts, and the kernel
dequantizes in registers inside the matrix multiply. The repacking only regroups and
multiplies out scales: every weight the kernel sees equals the format's dequantized
value (tests/test_cpu_quant.py checks the layer against dequantize-then-matmul).

Layouts (see the C file): 4-bit with a float32 scale and offset per 32 weights of a row
(Q4_0, Q4_1, Q4_K and int4), and 8-bit with a float32 scale per 16 or 32 (Q8_0, Q6_K,
Q5_0, int8). Q6_K's and Q5_0's values are held in 8 bits, so they read 1.25 bytes per
weight against the file's 0.82 and 0.69. Other GGUF formats (Q5_1, Q2_K, Q3_K, Q5_K,
float16 ...) are dequantized at load time.
"""
from __future__ import annotations

import ctypes
import functools
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from heron.kernels import cbuild
from heron.kernels.cpu_linear import run_linear_kernel
from heron.logger import get_logger
from heron.quantization import QuantizedLinear, QuantizedTensor

logger = get_logger(__name__)

_SOURCE = Path(__file__).parent / "csrc" / "cpu_quant.c"
_DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1}
FOUR_BIT, EIGHT_BIT = 1, 2
MAX_SEGMENTS = 8
# Formats this kernel runs (their weights must have in_features divisible by 32).
CPU_KERNEL_FORMATS = frozenset({"q4_0", "q4_1", "q4_k", "q5_0", "q8_0", "q6_k", "int8", "int4"})

_i32, _i64, _p = ctypes.c_int32, ctypes.c_int64, ctypes.c_void_p


class _Segment(ctypes.Structure):
    _fields_ = [("format", _i32), ("reserved", _i32), ("n", _i64), ("data", _p)]


class _QWeight(ctypes.Structure):
    _fields_ = [("num_segments", _i32), ("reserved", _i32), ("seg", _Segment * MAX_SEGMENTS)]


def _declare(lib: ctypes.CDLL) -> None:
    lib.heron_qlinear.argtypes = [_p, _i64, _p, _p, _p, _i64, _i64, _i64, _i64, ctypes.c_int,
                                  ctypes.c_int]
    lib.heron_qlinear.restype = ctypes.c_int


@functools.lru_cache(maxsize=None)
def load_quant() -> tuple[ctypes.CDLL | None, str]:
    """(library, "") or (None, why not); compiles on the first call of the process."""
    return cbuild.load_library(_SOURCE, _declare)


# -- decoding the block formats into (values, scales, offsets) -----------------------------

@dataclass
class Decoded:
    """A weight as the kernel computes it: w = d * q (+ m), one d (and m) per `block`."""
    bits: int                 # 4 or 8
    block: int
    q: np.ndarray             # [N, K] uint8 0..15 (4-bit) or int8 (8-bit)
    d: np.ndarray             # [N, K // block] float32
    m: np.ndarray | None      # [N, K // 32] float32 (4-bit only)


def _f16(raw: np.ndarray) -> np.ndarray:
    """float32 from little-endian float16 bytes [..., 2]."""
    return np.ascontiguousarray(raw).view(np.float16)[..., 0].astype(np.float32)


def _blocks(data: np.ndarray, k: int, per_block: int, nbytes: int) -> np.ndarray:
    n = data.shape[0]
    return data.reshape(n, k // per_block, nbytes)


def _nibbles_32(qs: np.ndarray) -> np.ndarray:
    """GGUF's 4-bit packing of 32 values in 16 bytes: value j in the low nibble of byte j,
    value j + 16 in its high nibble."""
    return np.concatenate([qs & 15, qs >> 4], axis=-1)


def _decode_q4_0(data: np.ndarray, k: int) -> Decoded:
    b = _blocks(data, k, 32, 18)
    d = _f16(b[..., 0:2])
    return Decoded(4, 32, _nibbles_32(b[..., 2:]).reshape(len(data), k), d, -8 * d)


def _decode_q4_1(data: np.ndarray, k: int) -> Decoded:
    b = _blocks(data, k, 32, 20)
    return Decoded(4, 32, _nibbles_32(b[..., 4:]).reshape(len(data), k), _f16(b[..., 0:2]),
                   _f16(b[..., 2:4]))


def _decode_q5_0(data: np.ndarray, k: int) -> Decoded:
    b = _blocks(data, k, 32, 22)
    high = np.ascontiguousarray(b[..., 2:6]).view(np.uint32)          # bit i: value i's 5th bit
    bits = ((high >> np.arange(32, dtype=np.uint32)) & 1).astype(np.uint8)
    q = (_nibbles_32(b[..., 6:]) | (bits << 4)).astype(np.int16) - 16
    return Decoded(8, 32, q.astype(np.int8).reshape(len(data), k), _f16(b[..., 0:2]), None)


def _decode_q8_0(data: np.ndarray, k: int) -> Decoded:
    b = _blocks(data, k, 32, 34)
    q = np.ascontiguousarray(b[..., 2:]).view(np.int8).reshape(len(data), k)
    return Decoded(8, 32, q, _f16(b[..., 0:2]), None)


def _k_scales_mins(s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K's eight 6-bit sub-block scales and mins from its 12 packed bytes [..., 12]."""
    s = s.astype(np.uint8)
    lo_sc, lo_m = s[..., 0:4] & 63, s[..., 4:8] & 63
    hi_sc = (s[..., 8:12] & 15) | ((s[..., 0:4] >> 6) << 4)
    hi_m = (s[..., 8:12] >> 4) | ((s[..., 4:8] >> 6) << 4)
    return (np.concatenate([lo_sc, hi_sc], axis=-1).astype(np.float32),
            np.concatenate([lo_m, hi_m], axis=-1).astype(np.float32))


def _decode_q4_k(data: np.ndarray, k: int) -> Decoded:
    n = len(data)
    b = _blocks(data, k, 256, 144)
    d, dmin = _f16(b[..., 0:2]), _f16(b[..., 2:4])
    sc, mn = _k_scales_mins(b[..., 4:16])
    # 128 bytes = 4 chunks of 32: a chunk's low nibbles are sub-block 2c, its high 2c + 1
    qs = b[..., 16:].reshape(n, k // 256, 4, 32)
    q = np.stack([qs & 15, qs >> 4], axis=3).reshape(n, k)
    # d * sc and dmin * m are exact in float32 (11-bit mantissas times 6-bit integers)
    scale = (d[..., None] * sc).reshape(n, k // 32)
    offset = (-(dmin[..., None] * mn)).reshape(n, k // 32)
    return Decoded(4, 32, q, scale, offset)


def _decode_q6_k(data: np.ndarray, k: int) -> Decoded:
    n = len(data)
    b = _blocks(data, k, 256, 210)
    ql = b[..., 0:128].reshape(n, -1, 2, 64)           # two halves of 128 values
    qh = b[..., 128:192].reshape(n, -1, 2, 32)
    scales = np.ascontiguousarray(b[..., 192:208]).view(np.int8).astype(np.float32)
    d = _f16(b[..., 208:210])
    lo = np.concatenate([ql[..., :32] & 15, ql[..., 32:] & 15, ql[..., :32] >> 4,
                         ql[..., 32:] >> 4], axis=-1)   # [n, sb, 2, 128]
    hi = np.concatenate([qh & 3, (qh >> 2) & 3, (qh >> 4) & 3, (qh >> 6) & 3], axis=-1)
    q = ((lo | (hi << 4)).astype(np.int16) - 32).astype(np.int8).reshape(n, k)
    scale = (d[..., None] * scales).reshape(n, k // 16)   # exact: 11 bits times 8 bits
    return Decoded(8, 16, q, scale, None)


def _decode_int8(data: np.ndarray, k: int) -> Decoded:
    from heron.quantization.weight_only import split_int8
    q, scale = split_int8(data, k)
    return Decoded(8, 32, q, np.repeat(scale[:, None], k // 32, axis=1), None)


def _decode_int4(data: np.ndarray, k: int) -> Decoded:
    from heron.quantization.weight_only import split_int4
    q, scale, offset = split_int4(data, k)
    return Decoded(4, 32, q, scale, offset)


_DECODERS = {"q4_0": _decode_q4_0, "q4_1": _decode_q4_1, "q5_0": _decode_q5_0,
             "q8_0": _decode_q8_0,
             "q4_k": _decode_q4_k, "q6_k": _decode_q6_k, "int8": _decode_int8,
             "int4": _decode_int4}


def decode(tensor: QuantizedTensor) -> Decoded:
    """The tensor as the kernel's (q, d, m); ValueError for a format it does not run."""
    if tensor.qtype not in _DECODERS:
        raise ValueError(f"{tensor.name}: no cpu kernel for {tensor.qtype}")
    if tensor.in_features % 32:
        raise ValueError(f"{tensor.name}: in_features {tensor.in_features} is not a multiple "
                         f"of 32")
    return _DECODERS[tensor.qtype](tensor.data.numpy(), tensor.in_features)


# -- packing into the kernel's records -------------------------------------------------------

def pack(dec: Decoded) -> np.ndarray:
    """The records of `dec` as csrc/cpu_quant.c reads them: 4-bit [ceil(N / 2)][K / 32][48]
    (columns in pairs, an odd last one paired with zeros), 8-bit [N][K / 32][40]."""
    n, k = dec.q.shape
    nb = k // 32
    if dec.bits == 4:
        pad = n % 2
        q = np.pad(dec.q.astype(np.uint8), ((0, pad), (0, 0))).reshape(-1, 2, nb, 32)
        nibbles = q[..., :16] | (q[..., 16:] << 4)             # value j low, j + 16 high
        d, m = (np.pad(a.astype(np.float32), ((0, pad), (0, 0))).reshape(-1, 2, nb)
                for a in (dec.d, dec.m))
        scales = np.concatenate([d, m], axis=1)                # [pairs, 4, nb]: da db ma mb
        parts = [nibbles.transpose(0, 2, 1, 3).reshape(-1, nb, 32),
                 np.ascontiguousarray(scales.transpose(0, 2, 1)).view(np.uint8)]
    else:
        d = dec.d.astype(np.float32)
        halves = np.repeat(d, 2, axis=1) if dec.block == 32 else d   # d0, d1 per block
        parts = [dec.q.reshape(n, nb, 32).astype(np.int8).view(np.uint8),
                 np.ascontiguousarray(halves.reshape(n, nb, 2)).view(np.uint8)]
    return np.ascontiguousarray(np.concatenate(parts, axis=-1))


def cpu_runs(layer: QuantizedLinear) -> bool:
    """Whether CpuQuantLinear takes this layer (formats, shapes and the build)."""
    return (layer.formats() <= CPU_KERNEL_FORMATS and layer.in_features % 32 == 0
            and len(layer.parts) <= MAX_SEGMENTS and load_quant()[0] is not None)


class CpuQuantLinear(nn.Module):
    """y = x @ W^T + b with W in 4 or 8 bits, dequantized inside the matmul."""

    def __init__(self, layer: QuantizedLinear, dtype: torch.dtype,
                 library: ctypes.CDLL | None = None) -> None:
        """`library`: a build of csrc/cpu_quant.c other than the default (tests compare
        the portable build with the AVX2 one)."""
        super().__init__()
        lib, why = (library, "") if library is not None else load_quant()
        if lib is None:
            raise RuntimeError(f"the quantized linear kernel is unavailable: {why}")
        if dtype not in _DTYPE_CODES:
            raise ValueError(f"CpuQuantLinear runs float32 or bfloat16 activations, not {dtype}")
        self._lib = lib
        self.in_features, self.out_features = layer.in_features, layer.out_features
        self.dtype = dtype
        self.formats = "+".join(p.qtype for p in layer.parts)
        self.qweight = _QWeight()
        self.qweight.num_segments = len(layer.parts)
        for i, part in enumerate(layer.parts):
            dec = decode(part)
            packed = torch.from_numpy(pack(dec))
            self.register_buffer(f"segment{i}", packed, persistent=False)
            self.qweight.seg[i] = _Segment(FOUR_BIT if dec.bits == 4 else EIGHT_BIT, 0,
                                           part.out_features, packed.data_ptr())
        self.bias = None if layer.bias is None else layer.bias.detach().to(dtype).contiguous()

    @property
    def weight_address(self) -> int:
        """What the C side takes as the weight (the QWeight descriptor)."""
        return ctypes.addressof(self.qweight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return run_linear_kernel(self._lib.heron_qlinear, "CpuQuantLinear", x,
                                 self.weight_address, self.bias, self.in_features,
                                 self.out_features, self.dtype, _DTYPE_CODES[self.dtype])

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"formats={self.formats}")


def replace_quantized_layers(model: nn.Module, dtype: torch.dtype) -> int:
    """Swap every QuantizedLinear the kernel runs for a CpuQuantLinear; returns how many
    (the rest stay for `dequantize_linears`)."""
    count = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, QuantizedLinear) and cpu_runs(child):
                setattr(parent, name, CpuQuantLinear(child, dtype))
                count += 1
    if count:
        logger.info("%d linear layers run on the quantized kernel (cpu_quant.c)", count)
    return count
