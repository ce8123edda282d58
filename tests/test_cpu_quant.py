"""The cpu platform's quantized linear kernel (csrc/cpu_quant.c) against dequantize-then-matmul.

The kernel quantizes activations to int8 per 32-wide block (as llama.cpp does), so it
is not equal to a float matmul of the dequantized weight. Its error is bounded exactly:
per output, |sum_k w_k (x_k - dx_b q_k)| <= sum_k |w_k| dx_b / 2 (round to nearest),
plus float32 rounding. The tests assert that bound for every format on random blocks,
which any wrong scale, offset, nibble order or sub-block would break by orders of
magnitude; and that the results do not depend on the batch or on the build.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from heron.kernels import cbuild
from heron.kernels.cpu_quant import CpuQuantLinear, _declare, _SOURCE, load_quant
from heron.quantization import QuantizedLinear, QuantizedTensor
from heron.quantization.weight_only import quantize_int4, quantize_int8

gguf = pytest.importorskip("gguf")
pytestmark = pytest.mark.skipif(load_quant()[0] is None, reason="cpu_quant.c does not build here")

FORMATS = ["q4_0", "q4_1", "q5_0", "q8_0", "q4_k", "q6_k", "int8", "int4"]


def random_tensor(qtype: str, n: int, k: int, rng: np.random.Generator) -> QuantizedTensor:
    """Random rows in `qtype`: quantized from Gaussian weights where gguf quantizes the
    format, else random block bytes with sane float16 scales."""
    kind = gguf.GGMLQuantizationType[qtype.upper()] if qtype.startswith("q") else None
    if qtype in ("q4_0", "q4_1", "q5_0", "q8_0"):
        data = gguf.quants.quantize(rng.standard_normal((n, k)).astype(np.float32), kind)
        return QuantizedTensor(qtype, (n, k), torch.from_numpy(data), qtype)
    if qtype in ("int8", "int4"):
        quantize = quantize_int8 if qtype == "int8" else quantize_int4
        return quantize(torch.from_numpy(rng.standard_normal((n, k)).astype(np.float32)), qtype)
    per, nbytes = gguf.GGML_QUANT_SIZES[kind]
    raw = rng.integers(0, 256, (n, k // per, nbytes), dtype=np.uint8)
    scale = (rng.random((n, k // per)) * 0.02 + 0.001).astype(np.float16)
    scale = scale.view(np.uint8).reshape(n, k // per, 2)
    if qtype == "q4_k":
        raw[..., 0:2], raw[..., 2:4] = scale, scale      # d and dmin
    else:
        raw[..., 208:210] = scale                       # q6_k's d
    return QuantizedTensor(qtype, (n, k), torch.from_numpy(raw.reshape(n, -1)), qtype)


def layer_of(parts: list[QuantizedTensor], bias: torch.Tensor | None) -> QuantizedLinear:
    layer = QuantizedLinear(parts[0].in_features, sum(p.out_features for p in parts), bias,
                            torch.float32, len(parts))
    for i, part in enumerate(parts):
        layer.set_part(i, part)
    return layer


def error_bound(w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Per output [M, N]: the activation-quantization bound plus float32 rounding slack."""
    xb = x.double().reshape(x.shape[0], -1, 32)
    dx = xb.abs().amax(dim=2, keepdim=True) / 127
    half_step = (dx / 2).expand_as(xb).reshape(x.shape)            # [M, K]
    bound = half_step @ w.double().abs().T
    slack = 1e-5 * (x.double().abs() @ w.double().abs().T) + 1e-6
    return bound + slack


@pytest.mark.parametrize("qtype", FORMATS)
def test_kernel_within_the_activation_quantization_bound(qtype: str) -> None:
    rng = np.random.default_rng(FORMATS.index(qtype))
    k = 512 if qtype in ("q4_k", "q6_k") else 96
    # two segments in different formats, with column counts off the tile widths
    other = "q8_0" if qtype != "q8_0" else "q4_1"
    layer = layer_of([random_tensor(qtype, 37, k, rng), random_tensor(other, 22, k, rng)],
                     torch.randn(59, generator=torch.Generator().manual_seed(0)))
    w = layer.dequantized_weight(torch.float32)
    kernel = CpuQuantLinear(layer, torch.float32)
    for m in (1, 3, 5, 9, 70):
        x = torch.from_numpy(rng.standard_normal((m, k)).astype(np.float32))
        got = kernel(x).double()
        want = x.double() @ w.double().T + layer.bias.double()
        excess = (got - want).abs() - error_bound(w, x)
        assert excess.max().item() <= 0, f"{qtype}, {m} rows: beyond the bound by {excess.max()}"
        # and the error is not trivially zero: activations really are quantized
        assert (got - want).abs().max().item() > 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rows_do_not_depend_on_the_batch(dtype: torch.dtype) -> None:
    rng = np.random.default_rng(7)
    layer = layer_of([random_tensor("q4_k", 50, 256, rng), random_tensor("q6_k", 30, 256, rng)],
                     None)
    kernel = CpuQuantLinear(layer, dtype)
    x = torch.from_numpy(rng.standard_normal((67, 256)).astype(np.float32)).to(dtype)
    full = kernel(x)
    for rows in (slice(0, 1), slice(5, 9), slice(60, 67), slice(13, 14)):
        assert torch.equal(kernel(x[rows]), full[rows])


def test_portable_build_gives_the_same_bits() -> None:
    portable, why = cbuild.load_library(_SOURCE, _declare, (cbuild.FLAG_SETS[-1],))
    if portable is None:
        pytest.skip(why)
    rng = np.random.default_rng(3)
    layer = layer_of([random_tensor("q4_1", 40, 128, rng), random_tensor("q8_0", 24, 128, rng)],
                     torch.randn(64))
    x = torch.from_numpy(rng.standard_normal((9, 128)).astype(np.float32))
    native = CpuQuantLinear(layer, torch.float32)(x)
    assert torch.equal(CpuQuantLinear(layer, torch.float32, library=portable)(x), native)


def test_bad_shapes_are_refused() -> None:
    rng = np.random.default_rng(1)
    kernel = CpuQuantLinear(layer_of([random_tensor("q8_0", 16, 64, rng)], None), torch.float32)
    with pytest.raises(ValueError, match="64 features"):
        kernel(torch.zeros(2, 32))
    with pytest.raises(ValueError, match="bfloat16|float32"):
        kernel(torch.zeros(2, 64, dtype=torch.bfloat16))
