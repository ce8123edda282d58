"""Paged attention in Triton: the attention backend of the cuda and rocm platforms.

One kernel source serves NVIDIA (PTX) and AMD (AMDGCN) GPUs. The kernels live in
`heron.kernels.triton_kernels`; this module only decides shapes and launches them,
and imports triton on the first forward pass, never at import time (the cuda
plugin registers this class in processes that have no GPU and maybe no triton).

Cache layout of one layer: `[2, num_blocks, block_size, num_kv_heads, head_size]`,
the reference backend's (see triton_kernels/__init__.py for why it suits GPUs).

A step is two launches, plus one for long decodes:
  1. write_kv_kernel stores every new token's key and value (the contract: all
     writes before any read, since prefix-cached blocks may be shared in a batch);
  2. paged_attention_kernel attends for the whole mixed batch (prefill chunks and
     decodes) in one grid;
  3. for decode-only batches of long contexts, the key range is split along the
     sequence and split_reduce_kernel merges the pieces.

Tile shapes are defaults chosen without a GPU to measure on;
benchmarks/gpu_check.py times them on a lent one.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

from heron.kernels.interface import AttentionBackend, AttentionMetadata

LOG2_E = 1.4426950408889634


@dataclass(frozen=True)
class Tiles:
    """Rows of the query matrix (tokens x heads of a kv group) and keys per inner step."""
    block_m: int
    block_n: int
    num_warps: int = 4


# Prefill: 64 query rows amortise each key tile over many tokens.
PREFILL_TILES = Tiles(block_m=64, block_n=32)
# Decode: one token per sequence; 16 rows is tl.dot's minimum, and wider key tiles
# keep more bytes in flight for a memory-bound loop.
DECODE_TILES = Tiles(block_m=16, block_n=64)


def _pow2(n: int) -> int:
    return 1 << max(0, math.ceil(math.log2(max(1, n))))


@functools.cache
def _kernels():
    # The only import of triton on heron's path (and only once a forward pass runs).
    from heron.kernels.triton_kernels import attention, cache_write
    return attention, cache_write


@functools.cache
def _multiprocessors(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4   # the interpreter on CPU tensors: splits only matter for coverage there


def launch_constants(dtype: torch.dtype, head_size: int, group: int, block_size: int,
                     tiles: Tiles, is_split: bool) -> dict[str, object]:
    """The constexpr arguments of paged_attention_kernel for one configuration
    (shared with the compile tests, so they build what the backend launches)."""
    group_pad = _pow2(group)
    return dict(HEAD_SIZE=head_size, HEAD_PAD=max(16, _pow2(head_size)), GROUP=group,
                GROUP_PAD=group_pad, BLOCK_M=max(tiles.block_m, group_pad, 16),
                BLOCK_N=max(16, tiles.block_n), BLOCK_SIZE=block_size, IS_SPLIT=is_split,
                IEEE_DOT=dtype == torch.float32)


class TritonAttention(AttentionBackend):
    name = "triton"
    # Split a decode's key range only when each piece keeps at least this many keys.
    min_split_tokens = 256
    max_splits = 16

    def __init__(self, num_heads: int, num_kv_heads: int, head_size: int, scale: float) -> None:
        super().__init__(num_heads, num_kv_heads, head_size, scale)
        if head_size > 256:
            raise ValueError(f"the triton attention backend takes head sizes up to 256, "
                             f"got {head_size}")
        self.group = num_heads // num_kv_heads
        # Tests set this to force (or forbid) the split path; None: the heuristic decides.
        self.num_splits_override: int | None = None

    @staticmethod
    def kv_cache_shape(num_blocks: int, block_size: int, num_kv_heads: int,
                       head_size: int) -> tuple[int, ...]:
        return (2, num_blocks, block_size, num_kv_heads, head_size)

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                kv_cache: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        self.write_kv(kv_cache, key, value, meta.slot_mapping)
        return self.attend(query, kv_cache, meta)

    # -- the two steps -------------------------------------------------------------------

    def write_kv(self, kv_cache: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                 slot_mapping: torch.Tensor) -> None:
        """Store key/value [T, Hkv, D] at `slot_mapping` (negative slots are skipped)."""
        if key.shape[0] == 0:
            return
        _, cache_write = _kernels()
        self._check_cache(kv_cache)
        key, value = _last_dim_contiguous(key), _last_dim_contiguous(value)
        k_cache, v_cache = kv_cache[0], kv_cache[1]
        cache_write.write_kv_kernel[(key.shape[0],)](
            key, value, k_cache, v_cache, slot_mapping, self.num_kv_heads,
            key.stride(0), key.stride(1), value.stride(0), value.stride(1),
            k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
            HEAD_SIZE=self.head_size, HEAD_PAD=_pow2(self.head_size),
            HEADS_PAD=_pow2(self.num_kv_heads), BLOCK_SIZE=k_cache.shape[1])

    def attend(self, query: torch.Tensor, kv_cache: torch.Tensor,
               meta: AttentionMetadata) -> torch.Tensor:
        """Causal attention of query [T, Hq, D] over the cache; returns [T, Hq, D]."""
        attention, _ = _kernels()
        self._check_cache(kv_cache)
        out_dtype = query.dtype
        query = _last_dim_contiguous(query.to(kv_cache.dtype))
        out = torch.empty(query.shape, dtype=kv_cache.dtype, device=query.device)
        if meta.num_tokens == 0:
            return out.to(out_dtype)
        decode_only = meta.max_query_len == 1
        tiles = DECODE_TILES if decode_only else PREFILL_TILES
        splits = self.num_splits(meta, query.device)
        k_cache, v_cache = kv_cache[0], kv_cache[1]
        consts = launch_constants(kv_cache.dtype, self.head_size, self.group,
                                  k_cache.shape[1], tiles, splits > 1)
        block_q = consts["BLOCK_M"] // consts["GROUP_PAD"]
        grid = (meta.num_tokens // block_q + meta.num_seqs, self.num_kv_heads, splits)
        parts = self._partials(splits, query, consts["HEAD_PAD"])
        attention.paged_attention_kernel[grid](
            out, *parts, query, k_cache, v_cache, meta.block_tables, meta.seq_lens,
            meta.query_start_loc, self.scale * LOG2_E, meta.num_seqs, meta.num_tokens, splits,
            query.stride(0), query.stride(1), out.stride(0), out.stride(1),
            k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), meta.block_tables.stride(0),
            num_warps=tiles.num_warps, **consts)
        if splits > 1:
            attention.split_reduce_kernel[(meta.num_tokens, self.num_heads)](
                out, *parts, meta.num_tokens, splits, out.stride(0), out.stride(1),
                HEAD_SIZE=self.head_size, HEAD_PAD=consts["HEAD_PAD"], SPLITS_PAD=_pow2(splits))
        return out.to(out_dtype)

    # -- helpers -------------------------------------------------------------------------

    def num_splits(self, meta: AttentionMetadata, device: torch.device) -> int:
        """Pieces to cut each decode's key range into: enough programs for about two per
        multiprocessor, each piece at least `min_split_tokens` keys, a power of two."""
        if self.num_splits_override is not None:
            return max(1, self.num_splits_override)
        if meta.max_query_len != 1:
            return 1
        programs = meta.num_seqs * self.num_kv_heads
        wanted = -(-2 * _multiprocessors(device) // programs)
        limit = min(wanted, meta.max_seq_len // self.min_split_tokens, self.max_splits)
        return 1 << (limit.bit_length() - 1) if limit >= 2 else 1

    def _partials(self, splits: int, query: torch.Tensor,
                  head_pad: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if splits == 1:
            dummy = query.new_empty(1, dtype=torch.float32)   # never touched without splits
            return dummy, dummy, dummy
        t, h = query.shape[0], query.shape[1]
        acc = torch.empty(splits, t, h, head_pad, dtype=torch.float32, device=query.device)
        m = torch.empty(splits, t, h, dtype=torch.float32, device=query.device)
        return acc, m, torch.empty_like(m)

    def _check_cache(self, kv_cache: torch.Tensor) -> None:
        if (kv_cache.dim() != 5 or kv_cache.shape[0] != 2 or kv_cache.shape[3] != self.num_kv_heads
                or kv_cache.shape[4] != self.head_size or not kv_cache.is_contiguous()):
            raise ValueError(
                f"the triton attention backend expects a contiguous KV cache of shape "
                f"[2, num_blocks, block_size, {self.num_kv_heads}, {self.head_size}], "
                f"got {tuple(kv_cache.shape)}")


def _last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    # Views of a fused qkv projection keep a unit stride on the last dim: no copy then.
    return t if t.stride(-1) == 1 else t.contiguous()
