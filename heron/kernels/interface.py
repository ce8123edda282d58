"""The attention-backend contract shared by every platform.

One forward pass packs several sequences (prefill chunks and decodes mixed) into
one flat batch of tokens. For sequence i, its new tokens are rows
`query_start_loc[i]:query_start_loc[i+1]` of q/k/v, and after this step its KV
cache holds `seq_lens[i]` tokens (the context already cached plus the new ones),
so its new tokens sit at positions `seq_lens[i] - query_len_i ... seq_lens[i] - 1`.
Attention is causal: a token at position p sees cached positions 0..p.

A backend stores the keys/values of *every* new token of the batch before any
sequence attends: a sequence may reuse (through the prefix cache) blocks that
another sequence of the same batch is filling in this very step.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar, Protocol

import torch


@dataclass
class AttentionMetadata:
    """Where each sequence's tokens are in the flat batch and in the paged KV cache."""
    num_seqs: int
    num_tokens: int
    query_start_loc: torch.Tensor   # int32 [num_seqs + 1], cumulative query lengths
    seq_lens: torch.Tensor          # int32 [num_seqs], tokens in the cache after this step
    block_tables: torch.Tensor      # int32 [num_seqs, max_blocks_per_seq], padded with 0
    slot_mapping: torch.Tensor      # int64 [num_tokens], block_id * block_size + offset
    max_query_len: int
    max_seq_len: int
    block_size: int
    # Host copies, for backends that split the batch in Python.
    query_start_loc_cpu: list[int]
    seq_lens_cpu: list[int]
    # Position of each token in its sequence (int64 [num_tokens]); the model's input too.
    positions: torch.Tensor | None = None

    @property
    def query_lens_cpu(self) -> list[int]:
        q = self.query_start_loc_cpu
        return [q[i + 1] - q[i] for i in range(self.num_seqs)]


class AttentionBackend(ABC):
    """Writes new keys/values into the paged cache and attends over it.

    A backend owns the layout of one layer's KV cache tensor (`kv_cache_shape`);
    the model runner allocates one such tensor per layer.

    The cache's dtype is the model's, or with `kv_cache_dtype="fp8"` an fp8 dtype
    (torch.float8_e4m3fn / float8_e5m2) on backends whose platform declares it; queries
    and outputs stay in the model's dtype. As in vLLM, fp8 caches store key / k_scale
    and value / v_scale and read them back times the scale. Both are 1.0 (no scaling:
    e4m3 covers +-448, far beyond the keys and values of the models heron runs); they
    are attributes so that a checkpoint's calibrated scales can be set later.
    """
    name: ClassVar[str]
    k_scale: float = 1.0
    v_scale: float = 1.0

    def __init__(self, num_heads: int, num_kv_heads: int, head_size: int, scale: float) -> None:
        if num_heads % num_kv_heads:
            raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_size = head_size
        self.scale = scale

    @staticmethod
    @abstractmethod
    def kv_cache_shape(num_blocks: int, block_size: int, num_kv_heads: int,
                       head_size: int) -> tuple[int, ...]:
        """Shape of one layer's cache tensor holding both keys and values."""

    @abstractmethod
    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                kv_cache: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """query [T, num_heads, head_size], key/value [T, num_kv_heads, head_size].

        Stores key/value at `meta.slot_mapping`, then returns [T, num_heads, head_size].
        """


# vLLM's kv_cache_dtype names of the fp8 formats ("fp8" is e4m3, as in vLLM).
_FP8_KV_DTYPES = {"fp8": torch.float8_e4m3fn, "fp8_e4m3": torch.float8_e4m3fn,
                  "fp8_e5m2": torch.float8_e5m2}


def kv_cache_torch_dtype(kv_cache_dtype: str, model_dtype: torch.dtype) -> torch.dtype:
    """The torch dtype of the KV cache for a config's `kv_cache_dtype`: the model's for
    "auto", torch.float8_e4m3fn for "fp8" and "fp8_e4m3", torch.float8_e5m2 for "fp8_e5m2"."""
    if kv_cache_dtype == "auto":
        return model_dtype
    if kv_cache_dtype not in _FP8_KV_DTYPES:
        raise ValueError(f"kv_cache_dtype={kv_cache_dtype!r} is not supported; use auto, "
                         + ", ".join(_FP8_KV_DTYPES))
    return _FP8_KV_DTYPES[kv_cache_dtype]


class CompiledForward(Protocol):
    """A platform's whole-model forward pass (`Platform.compiled_forward`): the same final
    hidden states as the eager model, computed without Python between the layers."""

    def __call__(self, input_ids: torch.Tensor, meta: AttentionMetadata,
                 kv_caches: list[torch.Tensor]) -> torch.Tensor | None:
        """input_ids int64 [T], the step's metadata (positions included), one KV cache per
        layer -> final hidden states [T, hidden]; stores the step's keys and values. None
        (before touching anything) hands this call to the eager model."""
