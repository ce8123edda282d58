"""Reference attention in plain torch: any device, any dtype (fp8 caches upcast on
reading), clear rather than fast.

Layout of one layer's cache: [2, num_blocks, block_size, num_kv_heads, head_size]
(index 0 keys, 1 values). Each sequence gathers its own context and runs a causal
softmax in float32, so results never depend on what else is in the batch.
"""
from __future__ import annotations

import torch

from heron.kernels.interface import AttentionBackend, AttentionMetadata


FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)


def write_kv(kv_cache: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
             slot_mapping: torch.Tensor, k_scale: float = 1.0, v_scale: float = 1.0) -> None:
    """Store new keys/values at their flat slots in a [2, blocks, block_size, H, D] cache.
    An fp8 cache stores key / k_scale and value / v_scale, rounded as torch rounds."""
    flat = kv_cache.view(2, -1, kv_cache.shape[-2], kv_cache.shape[-1])
    if kv_cache.dtype in FP8_DTYPES:
        # torch has no index_copy_ for fp8 dtypes: copy their bytes
        key = (key.float() / k_scale).to(kv_cache.dtype).view(torch.uint8)
        value = (value.float() / v_scale).to(kv_cache.dtype).view(torch.uint8)
        flat = flat.view(torch.uint8)
    flat[0].index_copy_(0, slot_mapping, key.to(flat.dtype))
    flat[1].index_copy_(0, slot_mapping, value.to(flat.dtype))


def gather_context(kv_cache: torch.Tensor, block_table: torch.Tensor, seq_len: int,
                   block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values [seq_len, H, D] of one sequence, in position order, as stored
    (an fp8 cache's without their scales)."""
    num_blocks = (seq_len + block_size - 1) // block_size
    blocks = block_table[:num_blocks].long()
    keys = kv_cache[0, blocks].flatten(0, 1)[:seq_len]
    values = kv_cache[1, blocks].flatten(0, 1)[:seq_len]
    return keys, values


class ReferenceAttention(AttentionBackend):
    name = "reference"

    @staticmethod
    def kv_cache_shape(num_blocks: int, block_size: int, num_kv_heads: int,
                       head_size: int) -> tuple[int, ...]:
        return (2, num_blocks, block_size, num_kv_heads, head_size)

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                kv_cache: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        write_kv(kv_cache, key, value, meta.slot_mapping, self.k_scale, self.v_scale)
        # fp8 caches are upcast on reading, times their scales
        k_scale, v_scale = ((self.k_scale, self.v_scale) if kv_cache.dtype in FP8_DTYPES
                            else (1.0, 1.0))
        out = torch.empty_like(query)
        group = self.num_heads // self.num_kv_heads
        starts = meta.query_start_loc_cpu
        for i in range(meta.num_seqs):
            q = query[starts[i]:starts[i + 1]].float()            # [Q, Hq, D]
            seq_len = meta.seq_lens_cpu[i]
            k, v = gather_context(kv_cache, meta.block_tables[i], seq_len, meta.block_size)
            k = (k.float() * k_scale).repeat_interleave(group, dim=1)   # [S, Hq, D]
            v = (v.float() * v_scale).repeat_interleave(group, dim=1)
            scores = torch.einsum("qhd,khd->hqk", q, k) * self.scale
            q_pos = torch.arange(seq_len - q.shape[0], seq_len, device=q.device)
            k_pos = torch.arange(seq_len, device=q.device)
            scores.masked_fill_(k_pos[None, None, :] > q_pos[None, :, None], float("-inf"))
            probs = torch.softmax(scores, dim=-1)
            out[starts[i]:starts[i + 1]] = torch.einsum("hqk,khd->qhd", probs, v).to(out.dtype)
        return out
