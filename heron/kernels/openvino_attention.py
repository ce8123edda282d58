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
    _set_cache_sizes(node, num_kv_heads, head_size)
    return [node.output(0)]


def _set_cache_sizes(node: Any, num_kv_heads: int, head_size: int) -> None:
    # The CPU device sizes the cache from these rt_info entries and refuses the node
    # without them. They are not saved in an IR: `reload_paged_attention` sets them again.
    info = node.get_rt_info()
    for key, value in (("num_k_heads", num_kv_heads), ("k_head_size", head_size),
                       ("num_v_heads", num_kv_heads), ("v_head_size", head_size)):
        info[key] = str(value)


def read_paged_model(core: Any, xml_path: str, num_kv_heads: int, head_size: int) -> Any:
    """Read an IR saved with PagedAttention nodes, which `Core.read_model` cannot build by
    itself (the operation is not in a public opset): each is read as a stand-in and then
    swapped for the real operation on the same inputs."""
    import openvino.op as ov_op

    core.add_extension(_stand_in_class())
    model = core.read_model(xml_path)
    for op in model.get_ordered_ops():
        if op.get_type_name() != "PagedAttentionExtension" or isinstance(
                op, ov_op._PagedAttentionExtension):
            continue
        real = ov_op._PagedAttentionExtension(op.input_values())
        _set_cache_sizes(real, num_kv_heads, head_size)
        for i in range(op.get_output_size()):
            op.output(i).replace(real.output(i))
    model.validate_nodes_and_infer_types()
    return model


_STAND_IN: Any = None


def _stand_in_class() -> Any:
    """An `openvino.Op` named like the PagedAttention operation: only its shape is right."""
    global _STAND_IN
    if _STAND_IN is not None:
        return _STAND_IN
    import openvino as ov

    class PagedAttentionExtension(ov.Op):   # the IR's type name
        def __init__(self, inputs: Any = None) -> None:
            super().__init__(self, inputs or [])
            if inputs:
                self.constructor_validate_and_infer_types()

        def validate_and_infer_types(self) -> None:
            if self.get_input_size() == 0:
                return
            dtype = self.get_input_element_type(0)
            self.set_output_size(3)   # attention output, scores, diversity (unused)
            self.set_output_type(0, dtype, self.get_input_partial_shape(0))
            self.set_output_type(1, dtype, ov.PartialShape([-1]))
            self.set_output_type(2, dtype, ov.PartialShape([-1]))

        def clone_with_new_inputs(self, new_inputs: Any) -> Any:
            return PagedAttentionExtension(new_inputs)

        def visit_attributes(self, visitor: Any) -> bool:
            return True

    _STAND_IN = PagedAttentionExtension
    return _STAND_IN
