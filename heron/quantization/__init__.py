"""Quantized weights, backend-neutral: what a loader produces and a platform's kernels run.

`QuantizedTensor` is one weight matrix in a block format (GGUF's, or heron's own for
weight-only quantization of ordinary checkpoints), rows whole and untouched.
`QuantizedLinear` is a linear layer over one or several such tensors stacked along the
output features (fused q|k|v and gate|up, whose parts may differ in format). A platform
with kernels for a format swaps the layer for its own in `prepare_model`; anywhere else
the layer is dequantized at load time (`dequantize_linears`).
"""
from heron.quantization.tensor import (QuantizedTensor, UnsupportedQuantType,
                                       dequantize_rows)
from heron.quantization.linear import QuantizedLinear, dequantize_linears

__all__ = ["QuantizedTensor", "UnsupportedQuantType", "dequantize_rows",
           "QuantizedLinear", "dequantize_linears"]
