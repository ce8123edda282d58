"""Micro-benchmark of one attention layer call: CpuAttention vs ReferenceAttention.

The shapes are SmolLM2-135M's (9 query heads, 3 KV heads, head_dim 64, bf16) in
the offline benchmark's regime on this machine:
  decode   64 sequences, one new token each, contexts of 50-450 tokens (and all 300)
  prefill  one 2048-token step of fresh prompts (40-330 tokens, the last chunked)
  chunked  one 2048-token step of 4 chunks of 512 tokens over 512 cached tokens
Each call reads a different one of several layer caches, as the engine's 30
layers do, so KV reads come from memory and not from a warm L3. KV GB/s counts
the keys and values of every sequence's whole context (bf16) per median call.

    .venv/bin/python benchmarks/attention_micro.py [--threads 2] [--block-size 16]
"""
from __future__ import annotations

import argparse
import random
import statistics
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from heron.kernels.cpu import CpuAttention
from heron.kernels.interface import AttentionBackend, AttentionMetadata
from heron.kernels.reference import ReferenceAttention

HQ, HK, D = 9, 3, 64


@dataclass
class Case:
    name: str
    contexts: list[int]        # tokens cached before the step
    query_lens: list[int]      # new tokens per sequence


def make_meta(case: Case, block_size: int, rng: random.Random) -> tuple[AttentionMetadata, int]:
    """Metadata with shuffled blocks, and the number of blocks the cache needs."""
    seq_lens = [c + q for c, q in zip(case.contexts, case.query_lens)]
    per_seq = [-(-s // block_size) for s in seq_lens]
    num_blocks = sum(per_seq) + 1
    ids = list(range(1, num_blocks))
    rng.shuffle(ids)
    table = torch.zeros(len(seq_lens), max(per_seq), dtype=torch.int32)
    starts, slots, at = [0], [], 0
    for i, n in enumerate(per_seq):
        table[i, :n] = torch.tensor(ids[at:at + n], dtype=torch.int32)
        at += n
        starts.append(starts[-1] + case.query_lens[i])
        for p in range(case.contexts[i], seq_lens[i]):
            slots.append(int(table[i, p // block_size]) * block_size + p % block_size)
    meta = AttentionMetadata(
        num_seqs=len(seq_lens), num_tokens=starts[-1],
        query_start_loc=torch.tensor(starts, dtype=torch.int32),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32), block_tables=table,
        slot_mapping=torch.tensor(slots, dtype=torch.int64), max_query_len=max(case.query_lens),
        max_seq_len=max(seq_lens), block_size=block_size, query_start_loc_cpu=starts,
        seq_lens_cpu=seq_lens)
    return meta, num_blocks


def time_backend(backend: AttentionBackend, case: Case, block_size: int, layers: int,
                 iters: int) -> list[float]:
    """Milliseconds of each forward call, rotating over `layers` caches."""
    rng = random.Random(0)
    meta, num_blocks = make_meta(case, block_size, rng)
    shape = backend.kv_cache_shape(num_blocks, block_size, HK, D)
    caches = [torch.randn(shape).to(torch.bfloat16) for _ in range(layers)]
    q = torch.randn(meta.num_tokens, HQ, D).to(torch.bfloat16)
    k = torch.randn(meta.num_tokens, HK, D).to(torch.bfloat16)
    v = torch.randn(meta.num_tokens, HK, D).to(torch.bfloat16)
    for cache in caches[:2]:
        backend.forward(q, k, v, cache, meta)
    times = []
    for i in range(iters):
        t0 = time.perf_counter()
        backend.forward(q, k, v, caches[i % layers], meta)
        times.append((time.perf_counter() - t0) * 1e3)
    return times


def time_sdpa(case: Case, iters: int) -> list[float]:
    """Milliseconds of torch SDPA per sequence over the new tokens only (no cache)."""
    qs = [torch.randn(1, HQ, n, D).to(torch.bfloat16) for n in case.query_lens]
    ks = [torch.randn(1, HK, n, D).to(torch.bfloat16) for n in case.query_lens]
    times = []
    for i in range(iters + 2):
        t0 = time.perf_counter()
        for q, k in zip(qs, ks):
            F.scaled_dot_product_attention(q, k, k, is_causal=True, enable_gqa=True)
        times.append((time.perf_counter() - t0) * 1e3)
    return times[2:]


def cases() -> list[Case]:
    rng = random.Random(1)
    decode = Case("decode 64 x ctx 50-450", [rng.randint(49, 449) for _ in range(64)], [1] * 64)
    decode300 = Case("decode 64 x ctx 300", [299] * 64, [1] * 64)
    prompts, total = [], 0
    while total < 2048:
        n = min(rng.randint(40, 330), 2048 - total)
        prompts.append(n)
        total += n
    prefill = Case(f"prefill 2048 fresh ({len(prompts)} seqs)", [0] * len(prompts), prompts)
    chunked = Case("prefill 2048 = 4 x 512 over 512 cached", [512] * 4, [512] * 4)
    return [decode, decode300, prefill, chunked]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--layers", type=int, default=8, help="caches rotated through")
    parser.add_argument("--iters", type=int, default=40)
    parser.add_argument("--skip-reference", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    scale = D ** -0.5
    cpu, ref = CpuAttention(HQ, HK, D, scale), ReferenceAttention(HQ, HK, D, scale)
    print(f"threads {args.threads}, block size {args.block_size}, bf16, "
          f"{HQ} query / {HK} kv heads, head_dim {D}")
    print(f"{'case':42} {'backend':10} {'median ms':>9} {'min ms':>8} {'KV GB/s':>8}")
    for case in cases():
        kv_bytes = sum(c + q for c, q in zip(case.contexts, case.query_lens)) * HK * D * 2 * 2
        rows = [("cpu", time_backend(cpu, case, args.block_size, args.layers, args.iters))]
        if not args.skip_reference:
            rows.append(("reference", time_backend(ref, case, args.block_size, 2,
                                                   max(3, args.iters // 10))))
        if all(c == 0 for c in case.contexts):
            rows.append(("torch sdpa", time_sdpa(case, max(3, args.iters // 4))))
        for backend, times in rows:
            ms = statistics.median(times)
            gbs = f"{kv_bytes / ms / 1e6:8.1f}" if case.name.startswith("decode") else ""
            print(f"{case.name:42} {backend:10} {ms:9.3f} {min(times):8.3f} {gbs:>8}")


if __name__ == "__main__":
    main()
