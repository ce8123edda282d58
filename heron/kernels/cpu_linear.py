"""Linear layers for the cpu platform: batch-invariant (the default) or oneDNN-prepacked.

`InvariantLinear` runs heron's own kernel (csrc/cpu_gemm.c): every output element is
one float32 chain of multiply-adds over the input features in a fixed order, so a
row's result does not depend on how many rows share the call. BLAS libraries choose
their algorithm by the row count (measured on this project's machines: MKL's float32
path for 1-7 rows differs from the one for 64; oneDNN's bfloat16 path on AVX-512
differs with the rows too), which made a greedy request's tokens depend on batching,
chunking, prefix-cache hits and preemption.

`PackedLinear` keeps the previous path: oneDNN reorders a bfloat16 weight into its
blocked layout on every plain `F.linear` call; packing each weight once after loading
removes that pass. Chosen with HERON_BATCH_INVARIANT=0, where speed matters more than
invariance.
"""
from __future__ import annotations

import ctypes
import functools
from pathlib import Path

import torch
from torch import nn

from heron.kernels import cbuild
from heron.logger import get_logger

logger = get_logger(__name__)

# Batch size the oneDNN blocked layout is tuned for: decode batches are tens of rows.
_PACK_HINT = 64
_SOURCE = Path(__file__).parent / "csrc" / "cpu_gemm.c"
_DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1}
_PANEL = 16   # output columns per packed panel (NB in the C file)


def _declare(lib: ctypes.CDLL) -> None:
    i64, i32, ptr = ctypes.c_int64, ctypes.c_int, ctypes.c_void_p
    lib.heron_linear.argtypes = [ptr, i64, ptr, ptr, ptr, i64, i64, i64, i64, i32, i32]
    lib.heron_linear.restype = i32
    lib.heron_pack.argtypes = [ptr, i64, ptr, i64, i64, i32]
    lib.heron_pack.restype = i32


@functools.lru_cache(maxsize=None)
def load_gemm() -> tuple[ctypes.CDLL | None, str]:
    """(library, "") or (None, why not); compiles on the first call of the process."""
    return cbuild.load_library(_SOURCE, _declare)


def invariant_linear_available(dtype: torch.dtype) -> bool:
    """Whether InvariantLinear can run weights of `dtype` here (float32 or bfloat16,
    and the C file builds)."""
    return dtype in _DTYPE_CODES and load_gemm()[0] is not None


class InvariantLinear(nn.Module):
    """y = x @ W^T + b, each row computed alone (see the module docstring)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None,
                 library: ctypes.CDLL | None = None) -> None:
        """`library`: a build of csrc/cpu_gemm.c other than the default (tests compare
        the variants for other vector widths)."""
        super().__init__()
        lib, why = (library, "") if library is not None else load_gemm()
        if lib is None:
            raise RuntimeError(f"the batch-invariant linear kernel is unavailable: {why}")
        if weight.dtype not in _DTYPE_CODES or weight.dim() != 2:
            raise ValueError(f"InvariantLinear takes a 2-d float32 or bfloat16 weight, got "
                             f"{weight.dtype} {tuple(weight.shape)}")
        self._lib = lib
        self.out_features, self.in_features = weight.shape
        self._code = _DTYPE_CODES[weight.dtype]
        weight = weight.detach().contiguous()
        panels = -(-self.out_features // _PANEL)
        self.packed = torch.empty(panels * self.in_features * _PANEL, dtype=weight.dtype)
        lib.heron_pack(weight.data_ptr(), weight.stride(0), self.packed.data_ptr(),
                       self.out_features, self.in_features, self._code)
        self.bias = None if bias is None else bias.detach().to(weight.dtype).contiguous()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return run_linear_kernel(self._lib.heron_linear, "InvariantLinear", x,
                                 self.packed.data_ptr(), self.bias, self.in_features,
                                 self.out_features, self.packed.dtype, self._code)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, invariant"


def run_linear_kernel(kernel: ctypes._CFuncPtr, name: str, x: torch.Tensor, weight: int,
                      bias: torch.Tensor | None, k: int, n: int, dtype: torch.dtype,
                      code: int) -> torch.Tensor:
    """y = x @ W^T + b through a C kernel with heron_linear's signature (`weight`: the
    address it takes as W, `code`: its dtype code); checks x and gives y its shape."""
    # A decode step calls this ~120 times at a few microseconds of kernel each: the
    # common case (2-d rows with contiguous features) takes no reshape.
    if x.dtype != dtype or x.device.type != "cpu" or x.shape[-1] != k:
        raise ValueError(f"{name} expects CPU {dtype} input with {k} features, got {x.dtype} "
                         f"{tuple(x.shape)} on {x.device}")
    rows = x if x.dim() == 2 else x.reshape(-1, k)
    m = rows.shape[0]
    if rows.stride(1) != 1 or (m > 1 and rows.stride(0) < k):
        rows = rows.contiguous()
    out = torch.empty((m, n), dtype=x.dtype)
    rc = kernel(rows.data_ptr(), rows.stride(0), weight,
                bias.data_ptr() if bias is not None else None, out.data_ptr(), n, m, n, k,
                code, torch.get_num_threads())
    if rc:
        raise RuntimeError(f"{name}'s kernel failed ({rc}): out of memory for {m} rows"
                           if rc == -2 else f"{name}'s kernel rejected its arguments ({rc})")
    return out if x.dim() == 2 else out.reshape(*x.shape[:-1], n)


def packing_available(dtype: torch.dtype) -> bool:
    """Whether this torch build can prepack weights of `dtype` for oneDNN (bfloat16 only)."""
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
    """y = x @ W^T + b with W kept in oneDNN's blocked layout (same results as F.linear)."""

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


def replace_linear_layers(model: nn.Module, make: type[nn.Module], dtype: torch.dtype) -> int:
    """Replace every nn.Linear of `model` whose weight is `dtype` by `make(weight, bias)`;
    a model with tied embeddings also gets its own `lm_head` (a copy: the embedding
    table stays for lookups). Returns the number of layers replaced."""
    count = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear) and child.weight.dtype == dtype:
                setattr(parent, name, make(child.weight, child.bias))
                count += 1
    embed = getattr(getattr(model, "model", None), "embed_tokens", None)
    if getattr(model, "lm_head", "absent") is None and isinstance(embed, nn.Embedding) \
            and embed.weight.dtype == dtype:
        model.lm_head = make(embed.weight, None)
        count += 1
    logger.info("%d linear layers run as %s", count, make.__name__)
    return count
