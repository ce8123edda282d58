"""Helpers to run a heron model by hand: paged metadata, KV caches, one forward step."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from heron.forward_context import ForwardContext, set_forward_context
from heron.kernels.interface import AttentionMetadata
from heron.kernels.reference import ReferenceAttention


@dataclass
class PagedSeq:
    """One sequence's token ids so far, how many are in the cache, and its blocks."""
    tokens: list[int]
    blocks: list[int]
    num_cached: int = 0
    logits: list[torch.Tensor] = field(default_factory=list)


def build_metadata(chunks: list[tuple[PagedSeq, int]], block_size: int,
                   device: torch.device | str = "cpu") -> tuple[AttentionMetadata, torch.Tensor,
                                                                  torch.Tensor]:
    """Metadata, input ids and positions for one step that computes `n` new tokens of each seq."""
    starts, seq_lens, slots, ids, positions = [0], [], [], [], []
    for seq, n in chunks:
        new_positions = range(seq.num_cached, seq.num_cached + n)
        starts.append(starts[-1] + n)
        seq_lens.append(seq.num_cached + n)
        positions += new_positions
        ids += seq.tokens[seq.num_cached:seq.num_cached + n]
        slots += [seq.blocks[p // block_size] * block_size + p % block_size for p in new_positions]
    width = max(len(seq.blocks) for seq, _ in chunks)
    tables = [seq.blocks + [0] * (width - len(seq.blocks)) for seq, _ in chunks]
    meta = AttentionMetadata(
        num_seqs=len(chunks), num_tokens=starts[-1],
        query_start_loc=torch.tensor(starts, dtype=torch.int32, device=device),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=device),
        block_tables=torch.tensor(tables, dtype=torch.int32, device=device),
        slot_mapping=torch.tensor(slots, dtype=torch.int64, device=device),
        max_query_len=max(n for _, n in chunks), max_seq_len=max(seq_lens),
        block_size=block_size, query_start_loc_cpu=starts, seq_lens_cpu=seq_lens)
    return (meta, torch.tensor(ids, dtype=torch.long, device=device),
            torch.tensor(positions, dtype=torch.long, device=device))


class PagedRunner:
    """Runs a heron model step by step over a paged cache with ReferenceAttention."""

    def __init__(self, model: torch.nn.Module, num_blocks: int, block_size: int,
                 dtype: torch.dtype = torch.float32) -> None:
        self.model = model
        self.block_size = block_size
        self.backend = ReferenceAttention(model.num_heads, model.num_kv_heads, model.head_dim,
                                          model.head_dim ** -0.5)
        shape = ReferenceAttention.kv_cache_shape(num_blocks, block_size, model.num_kv_heads,
                                                  model.head_dim)
        self.kv_caches = [torch.zeros(shape, dtype=dtype) for _ in range(model.num_layers)]

    @torch.inference_mode()
    def step(self, chunks: list[tuple[PagedSeq, int]]) -> None:
        """Compute the next `n` tokens of each sequence; append their logits to the sequence."""
        meta, ids, positions = build_metadata(chunks, self.block_size)
        ctx = ForwardContext(attn_metadata=meta, kv_caches=self.kv_caches, backend=self.backend)
        with set_forward_context(ctx):
            hidden = self.model(ids, positions)
        logits = self.model.compute_logits(hidden)
        for i, (seq, n) in enumerate(chunks):
            seq.logits.extend(logits[meta.query_start_loc_cpu[i]:meta.query_start_loc_cpu[i + 1]])
            seq.num_cached += n
