"""Helpers to run a heron model by hand: paged metadata, KV caches, one forward step."""
from __future__ import annotations

import random
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


def shuffled_block_metadata(specs: list[tuple[int, int]], block_size: int, seed: int,
                            device: torch.device | str = "cpu", spare_blocks: int = 3,
                            table_padding: int = 1) -> tuple[AttentionMetadata, int]:
    """Metadata for sequences (context, new tokens) on shuffled blocks (block 0 unused,
    `spare_blocks` left over, table rows padded with `table_padding` zeros beyond the
    longest); returns it and the block count a cache needs."""
    rng = random.Random(seed)
    seq_lens = [c + q for c, q in specs]
    per_seq = [-(-s // block_size) for s in seq_lens]
    num_blocks = 1 + sum(per_seq) + spare_blocks
    ids = list(range(1, num_blocks))
    rng.shuffle(ids)
    table = torch.zeros(len(specs), max(per_seq) + table_padding, dtype=torch.int32)
    starts, slots, at = [0], [], 0
    for i, ((ctx, new), n) in enumerate(zip(specs, per_seq)):
        table[i, :n] = torch.tensor(ids[at:at + n], dtype=torch.int32)
        at += n
        starts.append(starts[-1] + new)
        slots += [int(table[i, p // block_size]) * block_size + p % block_size
                  for p in range(ctx, ctx + new)]
    positions = [p for c, q in specs for p in range(c, c + q)]
    meta = AttentionMetadata(
        num_seqs=len(specs), num_tokens=starts[-1],
        query_start_loc=torch.tensor(starts, dtype=torch.int32, device=device),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=device),
        block_tables=table.to(device),
        slot_mapping=torch.tensor(slots, dtype=torch.int64, device=device),
        max_query_len=max(q for _, q in specs), max_seq_len=max(seq_lens), block_size=block_size,
        query_start_loc_cpu=starts, seq_lens_cpu=seq_lens,
        positions=torch.tensor(positions, dtype=torch.int64, device=device))
    return meta, num_blocks


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


def truncated_copy(src: str, dst: str, num_layers: int, keep_last: int = 0) -> str:
    """A copy of the model folder `src` in `dst` with `num_layers` decoder layers: its
    first `num_layers - keep_last` and its last `keep_last` (renumbered), with
    `num_hidden_layers` lowered in config.json and the dropped layers' weights removed.
    A cheap draft model for speculative decoding: same tokenizer, embeddings and head,
    fewer layers (keeping the last few layers, which shape the output, agrees with the
    full model far more often than cutting them off)."""
    import json
    import re
    import shutil
    from pathlib import Path

    from safetensors.torch import load_file, save_file

    src_path, dst_path = Path(src), Path(dst)
    dst_path.mkdir(parents=True, exist_ok=True)
    total = json.loads((src_path / "config.json").read_text())["num_hidden_layers"]
    kept = list(range(num_layers - keep_last)) + list(range(total - keep_last, total))
    new_index = {old: new for new, old in enumerate(kept)}
    layer = re.compile(r"((?:^|\.)layers\.)(\d+)(\.)")

    def renamed(name: str) -> str | None:
        match = layer.search(name)
        if match is None:
            return name
        new = new_index.get(int(match.group(2)))
        if new is None:
            return None
        return name[:match.start(2)] + str(new) + name[match.end(2):]

    for path in src_path.iterdir():
        if path.suffix == ".safetensors":
            tensors = {}
            for name, tensor in load_file(str(path)).items():
                new_name = renamed(name)
                if new_name is not None:
                    tensors[new_name] = tensor
            save_file(tensors, str(dst_path / path.name), metadata={"format": "pt"})
        elif path.name == "config.json":
            config = json.loads(path.read_text())
            config["num_hidden_layers"] = num_layers
            (dst_path / path.name).write_text(json.dumps(config, indent=2))
        elif path.name.endswith(".safetensors.index.json"):
            continue   # shard indexes would name the dropped weights
        elif path.is_file():
            shutil.copy(path, dst_path / path.name)
    return str(dst_path)


def generations(llm, prompts, params) -> list[tuple[list[int], list[float]]]:
    """(token ids, log-probability of each) of every prompt's first completion; the
    params must ask for logprobs."""
    outs = llm.generate(prompts, params, use_tqdm=False)
    return [(list(o.outputs[0].token_ids),
             [lp[t].logprob for t, lp in zip(o.outputs[0].token_ids, o.outputs[0].logprobs)])
            for o in outs]
