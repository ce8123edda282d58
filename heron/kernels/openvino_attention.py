"""Paged attention for the openvino platform: OpenVINO's PagedAttention operation.

heron's models are plain torch. To run one through OpenVINO, the openvino platform
traces it with this backend in the forward context: each attention layer then
calls the torch custom op `heron::paged_attention`, which does nothing in torch
(it only has to trace) and which the PyTorch frontend of `openvino.convert_model`
turns into OpenVINO's `PagedAttentionExtension` node through `conversion_extension()`.

That node writes the step's keys and values into the paged cache (graph inputs
owned by heron) and attends over it, reading the block table heron's KV-cache
manager built: `past_lens` (tokens already cached per sequence),
`subsequence_begins` (the batch's query_start_loc), `block_indices` with
`block_indices_begins` (each sequence's blocks, concatenated) and
`max_context_len`. The cache layout, [num_blocks, num_kv_heads, block_size,
head_size] with a block size of 32 on OpenVINO's CPU device, is chosen by the
device at compile time; the runner reads it from the compiled model.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from heron.kernels.interface import AttentionBackend


@torch.library.custom_op("heron::paged_attention", mutates_args=())
def paged_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                    key_cache: torch.Tensor, value_cache: torch.Tensor, past_lens: torch.Tensor,
                    subsequence_begins: torch.Tensor, block_indices: torch.Tensor,
                    block_indices_begins: torch.Tensor, max_context_len: torch.Tensor,
                    scale: float, num_kv_heads: int, head_size: int) -> torch.Tensor:
    """query [T, heads * head_size], key/value [T, kv_heads * head_size] -> like query.

    A placeholder for tracing only: OpenVINO computes it. Returns zeros so that a
    traced forward pass stays finite."""
    return torch.zeros_like(query)


@paged_attention.register_fake
def _paged_attention_fake(query: torch.Tensor, *args: Any) -> torch.Tensor:
    return torch.empty_like(query)


@dataclass
class PagedAttentionInputs:
    """The graph inputs every attention layer of the traced model reads (the counterpart of
    `AttentionMetadata` for a model compiled by OpenVINO)."""
    past_lens: torch.Tensor              # int32 [num_seqs]
    subsequence_begins: torch.Tensor     # int32 [num_seqs + 1]
    block_indices: torch.Tensor          # int32 [sum of blocks per sequence]
    block_indices_begins: torch.Tensor   # int32 [num_seqs + 1]
    max_context_len: torch.Tensor        # int32 []


class OpenVinoTracingAttention(AttentionBackend):
    """Emits `heron::paged_attention` while a model is traced for conversion; never runs a
    real step (the compiled OpenVINO model does). Each layer's `kv_cache` is its
    (key_cache, value_cache) pair of traced graph inputs."""

    name = "openvino"

    @staticmethod
    def kv_cache_shape(num_blocks: int, block_size: int, num_kv_heads: int,
                       head_size: int) -> tuple[int, ...]:
        return (num_blocks, num_kv_heads, block_size, head_size)

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                kv_cache: Any, meta: Any) -> torch.Tensor:
        key_cache, value_cache = kv_cache
        inputs: PagedAttentionInputs = meta
        out = paged_attention(
            query.flatten(1), key.flatten(1), value.flatten(1), key_cache, value_cache,
            inputs.past_lens, inputs.subsequence_begins, inputs.block_indices,
            inputs.block_indices_begins, inputs.max_context_len,
            self.scale, self.num_kv_heads, self.head_size)
        return out.view(query.shape)


# PagedAttentionExtension (OpenVINO 2026.x) takes 28 inputs; heron drives the first nine
# and max_context_len, the rest are optional features it leaves off.
_NUM_PA_INPUTS = 28


def conversion_extension() -> Any:
    """The PyTorch-frontend extension that turns `heron::paged_attention` into OpenVINO's
    PagedAttentionExtension node."""
    from openvino.frontend.pytorch import ConversionExtension
    return ConversionExtension("heron::paged_attention", _convert_paged_attention)


def _convert_paged_attention(context: Any) -> list[Any]:
    import numpy as np
    import openvino.op as ov_op
    import openvino.opset13 as ops

    def const(value: Any, dtype: Any) -> Any:
        return ops.constant(np.array(value, dtype=dtype)).output(0)

    def empty(dtype: Any, rank: int = 1) -> Any:
        return ops.constant(np.zeros([0] * rank, dtype=dtype)).output(0)

    graph_inputs = [context.get_input(i) for i in range(10)]
    scale = float(context.get_values_from_const_input(10))
    num_kv_heads = int(context.get_values_from_const_input(11))
    head_size = int(context.get_values_from_const_input(12))
    past_lens = graph_inputs[5]
    # One window per sequence (zeros: no score aggregation), shaped like past_lens.
    no_score_window = ops.multiply(past_lens, const(0, np.int32)).output(0)
    args = graph_inputs[:9] + [
        const(scale, np.float32),           # 9  scale
        const(0, np.int32),                 # 10 sliding_window (none)
        empty(np.float32),                  # 11 alibi_slopes
        graph_inputs[9],                    # 12 max_context_len
        no_score_window,                    # 13 score_aggregation_window
        empty(np.int32),                    # 14 rotated_block_indices
        empty(np.int32, 2),                 # 15 rotation_deltas
        empty(np.float32, 2),               # 16 rotation_trig_lut
        empty(np.float32),                  # 17 xattention_threshold
        const(0, np.int32),                 # 18 xattention_block_size
        const(0, np.int32),                 # 19 xattention_stride
        empty(np.float32),                  # 20 sinks
        const(0, np.int32),                 # 21 adaptive_rkv_start_size
        empty(np.int32),                    # 22 adaptive_rkv_evictable_sizes
        empty(np.int32),                    # 23 adaptive_rkv_diversity_block_set_indices
        empty(np.int32),                    # 24 ..._begins
        empty(np.int32),                    # 25 token_type_ids
        empty(np.uint8),                    # 26 qq_bias
        empty(np.int32),                    # 27 qq_bias_begins
    ]
    assert len(args) == _NUM_PA_INPUTS
    node = ov_op._PagedAttentionExtension(args)
    # The CPU device sizes the cache from these (it refuses the node without them).
    # Strings, because only those survive the export and import of a compiled model.
    info = node.get_rt_info()
    for key, value in (("num_k_heads", num_kv_heads), ("k_head_size", head_size),
                       ("num_v_heads", num_kv_heads), ("v_head_size", head_size)):
        info[key] = str(value)
    return [node.output(0)]
