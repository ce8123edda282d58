"""CpuAttention (the C kernel) against ReferenceAttention on random paged batches.

The two backends lay their caches out differently, so each test fills both with
the same logical context through each backend's own write path, then compares
outputs and the contexts read back in position order.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import pytest
import torch

import heron.kernels.cpu as cpu_mod
from heron.kernels import cbuild
from heron.kernels.cpu import CpuAttention, native_kernel_available
from heron.kernels.interface import AttentionMetadata
from heron.kernels.reference import ReferenceAttention, gather_context, write_kv
from model_utils import shuffled_block_metadata

needs_native = pytest.mark.skipif(not native_kernel_available(),
                                  reason="the C attention kernel does not build here")

# (context already cached, new tokens) per sequence: decodes, fresh prefills and
# prefill chunks over a cached context, with lengths that leave partial blocks.
MIXED = [(37, 1), (0, 19), (50, 13), (1, 1), (0, 1), (70, 1), (16, 16), (5, 40)]


@dataclass
class Batch:
    meta: AttentionMetadata
    num_blocks: int
    specs: list[tuple[int, int]]


def make_batch(specs: list[tuple[int, int]], block_size: int, seed: int = 0,
               spare_blocks: int = 3) -> Batch:
    """Metadata for sequences (context, new tokens) on shuffled blocks (block 0 unused)."""
    meta, num_blocks = shuffled_block_metadata(specs, block_size, seed, spare_blocks=spare_blocks)
    return Batch(meta, num_blocks, specs)


def context_slots(batch: Batch) -> torch.Tensor:
    """Flat slots of every sequence's already cached positions, in batch order."""
    bs, table = batch.meta.block_size, batch.meta.block_tables
    return torch.tensor([int(table[i, p // bs]) * bs + p % bs
                         for i, (ctx, _) in enumerate(batch.specs) for p in range(ctx)],
                        dtype=torch.int64)


def fill_caches(batch: Batch, ref_cache: torch.Tensor, cpu_cache: torch.Tensor,
                cpu: CpuAttention, num_kv_heads: int, head_size: int, dtype: torch.dtype) -> None:
    """Write the same random cached context into both caches, each in its own layout."""
    slots = context_slots(batch)
    k = torch.randn(len(slots), num_kv_heads, head_size).to(dtype)
    v = torch.randn(len(slots), num_kv_heads, head_size).to(dtype)
    write_kv(ref_cache, k, v, slots)
    cpu.write_kv(cpu_cache, k, v, slots)


def new_caches(batch: Batch, cpu: CpuAttention, num_kv_heads: int, head_size: int,
               dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Both caches, poisoned with NaN so that reading an unwritten slot shows."""
    bs = batch.meta.block_size
    ref_cache = torch.full(ReferenceAttention.kv_cache_shape(batch.num_blocks, bs, num_kv_heads,
                                                             head_size), float("nan"), dtype=dtype)
    cpu_cache = torch.full(cpu.kv_cache_shape(batch.num_blocks, bs, num_kv_heads, head_size),
                           float("nan"), dtype=dtype)
    return ref_cache, cpu_cache


def qkv(batch: Batch, num_heads: int, num_kv_heads: int, head_size: int, dtype: torch.dtype,
        seed: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    t = batch.meta.num_tokens
    return tuple(torch.randn(t, h, head_size, generator=g).to(dtype)
                 for h in (num_heads, num_kv_heads, num_kv_heads))


def tolerance(dtype: torch.dtype) -> dict[str, float]:
    # bf16: the kernel rounds probabilities to bf16 for P @ V, as flash attention does
    return {"atol": 1e-5, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 3e-2, "rtol": 3e-2}


def run_both(specs: list[tuple[int, int]], block_size: int, num_heads: int, num_kv_heads: int,
             head_size: int, dtype: torch.dtype):
    """One batch through both backends on caches with the same context: (batch, cpu backend,
    reference cache, cpu cache, reference output, cpu output)."""
    batch = make_batch(specs, block_size)
    scale = head_size ** -0.5
    ref = ReferenceAttention(num_heads, num_kv_heads, head_size, scale)
    cpu = CpuAttention(num_heads, num_kv_heads, head_size, scale)
    ref_cache, cpu_cache = new_caches(batch, cpu, num_kv_heads, head_size, dtype)
    fill_caches(batch, ref_cache, cpu_cache, cpu, num_kv_heads, head_size, dtype)
    q, k, v = qkv(batch, num_heads, num_kv_heads, head_size, dtype)
    expected = ref.forward(q, k, v, ref_cache, batch.meta)
    out = torch.full_like(q, float("nan"))
    got = cpu.forward(q, k, v, cpu_cache, batch.meta, out=out)
    return batch, cpu, ref_cache, cpu_cache, expected, got


@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("heads", [(4, 4), (6, 2), (8, 2)], ids=["mha", "gqa3", "gqa4"])
@pytest.mark.parametrize("head_size", [32, 64, 128])
@pytest.mark.parametrize("block_size", [2, 4, 16, 32])
def test_matches_reference(block_size, head_size, heads, dtype):
    num_heads, num_kv_heads = heads
    batch, cpu, ref_cache, cpu_cache, expected, got = run_both(
        MIXED, block_size, num_heads, num_kv_heads, head_size, dtype)
    assert not got.isnan().any(), "an output element was never written"
    torch.testing.assert_close(got.float(), expected.float(), **tolerance(dtype))
    # the caches hold the same context (old and new tokens) in their own layouts
    for i, seq_len in enumerate(batch.meta.seq_lens_cpu):
        table = batch.meta.block_tables[i]
        want = gather_context(ref_cache, table, seq_len, block_size)
        have = cpu.gather_context(cpu_cache, table, seq_len, block_size)
        assert torch.equal(want[0], have[0]) and torch.equal(want[1], have[1])


@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_block_size_one(dtype):
    # float32 runs the kernel; bfloat16 goes to the reference (the kernel pairs tokens)
    *_, expected, got = run_both(MIXED[:5], 1, 6, 2, 64, dtype)
    torch.testing.assert_close(got.float(), expected.float(), **tolerance(dtype))


@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("block_size", [16, 512])
def test_long_contexts_cross_softmax_segments(block_size, dtype):
    # over 256 keys the kernel rescales its running softmax; chunks start mid-segment;
    # blocks of 512 hold two segments
    specs = [(700, 1), (300, 37), (0, 300), (255, 2), (511, 1)]
    *_, expected, got = run_both(specs, block_size, 9, 3, 64, dtype)
    torch.testing.assert_close(got.float(), expected.float(), **tolerance(dtype))


@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_batch_invariance(dtype):
    """One sequence gives bitwise the same output alone as inside any batch."""
    block_size, hq, hk, d = 16, 9, 3, 64
    batch = make_batch(MIXED, block_size)
    cpu = CpuAttention(hq, hk, d, d ** -0.5)
    _, cache = new_caches(batch, cpu, hk, d, dtype)
    slots = context_slots(batch)
    cpu.write_kv(cache, torch.randn(len(slots), hk, d).to(dtype),
                 torch.randn(len(slots), hk, d).to(dtype), slots)
    q, k, v = qkv(batch, hq, hk, d, dtype)
    full = cpu.forward(q, k, v, cache.clone(), batch.meta)
    m = batch.meta
    for i in range(m.num_seqs):
        a, b = m.query_start_loc_cpu[i], m.query_start_loc_cpu[i + 1]
        alone = AttentionMetadata(
            num_seqs=1, num_tokens=b - a,
            query_start_loc=torch.tensor([0, b - a], dtype=torch.int32),
            seq_lens=m.seq_lens[i:i + 1].clone(), block_tables=m.block_tables[i:i + 1].clone(),
            slot_mapping=m.slot_mapping[a:b].clone(), max_query_len=b - a,
            max_seq_len=m.seq_lens_cpu[i], block_size=block_size, query_start_loc_cpu=[0, b - a],
            seq_lens_cpu=[m.seq_lens_cpu[i]])
        single = cpu.forward(q[a:b], k[a:b], v[a:b], cache.clone(), alone)
        assert torch.equal(single, full[a:b]), f"sequence {i} depends on the rest of the batch"


@needs_native
def test_thread_count_does_not_change_results():
    batch = make_batch(MIXED, 16)
    cpu = CpuAttention(8, 2, 64, 0.125)
    _, cache = new_caches(batch, cpu, 2, 64, torch.bfloat16)
    slots = context_slots(batch)
    cpu.write_kv(cache, torch.randn(len(slots), 2, 64).bfloat16(),
                 torch.randn(len(slots), 2, 64).bfloat16(), slots)
    q, k, v = qkv(batch, 8, 2, 64, torch.bfloat16)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = cpu.forward(q, k, v, cache.clone(), batch.meta)
        torch.set_num_threads(2)
        two = cpu.forward(q, k, v, cache.clone(), batch.meta)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, two)


@needs_native
def test_strided_views_of_a_fused_qkv():
    batch = make_batch(MIXED, 16)
    hq, hk, d = 6, 2, 64
    cpu, ref = CpuAttention(hq, hk, d, 0.125), ReferenceAttention(hq, hk, d, 0.125)
    ref_cache, cpu_cache = new_caches(batch, cpu, hk, d, torch.float32)
    fill_caches(batch, ref_cache, cpu_cache, cpu, hk, d, torch.float32)
    qkv_fused = torch.randn(batch.meta.num_tokens, (hq + 2 * hk) * d)
    q, k, v = qkv_fused.split([hq * d, hk * d, hk * d], dim=-1)
    q, k, v = q.view(-1, hq, d), k.view(-1, hk, d), v.view(-1, hk, d)
    assert not q.is_contiguous()
    got = cpu.forward(q, k, v, cpu_cache, batch.meta)
    want = ref.forward(q, k, v, ref_cache, batch.meta)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@needs_native
@pytest.mark.parametrize("q_dtype,cache_dtype", [(torch.float32, torch.bfloat16),
                                                 (torch.bfloat16, torch.float32)])
def test_query_dtype_other_than_the_cache(q_dtype, cache_dtype):
    batch = make_batch(MIXED, 16)
    cpu, ref = CpuAttention(6, 2, 64, 0.125), ReferenceAttention(6, 2, 64, 0.125)
    ref_cache, cpu_cache = new_caches(batch, cpu, 2, 64, cache_dtype)
    fill_caches(batch, ref_cache, cpu_cache, cpu, 2, 64, cache_dtype)
    q, k, v = qkv(batch, 6, 2, 64, q_dtype)
    got = cpu.forward(q, k, v, cpu_cache, batch.meta)
    assert got.dtype == q_dtype
    want = ref.forward(q, k, v, ref_cache, batch.meta)
    torch.testing.assert_close(got.float(), want.float(), **tolerance(torch.bfloat16))
    table, seq_len = batch.meta.block_tables[0], batch.meta.seq_lens_cpu[0]
    assert torch.equal(cpu.gather_context(cpu_cache, table, seq_len, 16)[0],
                       gather_context(ref_cache, table, seq_len, 16)[0])


@needs_native
def test_bad_metadata_is_rejected():
    batch = make_batch([(3, 2), (0, 4)], 4)
    cpu = CpuAttention(4, 2, 32, 0.2)
    cache = torch.zeros(cpu.kv_cache_shape(batch.num_blocks, 4, 2, 32))
    q, k, v = qkv(batch, 4, 2, 32, torch.float32)
    m = batch.meta
    m.seq_lens = m.seq_lens.long()
    with pytest.raises(ValueError, match="seq_lens"):
        cpu.forward(q, k, v, cache, m)
    m.seq_lens = m.seq_lens.int()
    m.block_tables[0, 0] = batch.num_blocks                   # past the end of the cache
    with pytest.raises(ValueError, match="block table"):
        cpu.forward(q, k, v, cache, m)
    m.block_tables[0, 0] = 1
    m.slot_mapping[0] = batch.num_blocks * 4
    with pytest.raises(ValueError, match="slot_mapping"):
        cpu.forward(q, k, v, cache, m)


def test_float16_and_reference_mode_fall_back(monkeypatch, caplog):
    """float16 caches and HERON_CPU_ATTENTION=reference give the reference's results."""
    batch = make_batch(MIXED[:4], 4)
    for dtype, mode in [(torch.float16, "auto"), (torch.bfloat16, "reference")]:
        monkeypatch.setenv("HERON_CPU_ATTENTION", mode)
        cpu_mod._warned.clear()
        cpu, ref = CpuAttention(4, 2, 32, 0.2), ReferenceAttention(4, 2, 32, 0.2)
        ref_cache, cpu_cache = new_caches(batch, cpu, 2, 32, dtype)
        fill_caches(batch, ref_cache, cpu_cache, cpu, 2, 32, dtype)
        q, k, v = qkv(batch, 4, 2, 32, dtype)
        with caplog.at_level(logging.WARNING, logger="heron"):
            got = cpu.forward(q, k, v, cpu_cache, batch.meta)
        assert torch.equal(got, ref.forward(q, k, v, ref_cache, batch.meta))
        assert "reference" in caplog.text
        caplog.clear()


def test_missing_compiler(monkeypatch):
    """Without gcc: auto falls back to the reference, native is an error."""
    monkeypatch.setattr(cbuild.shutil, "which", lambda name: None)
    cpu_mod._load_kernel.cache_clear()
    try:
        monkeypatch.setenv("HERON_CPU_ATTENTION", "auto")
        assert not native_kernel_available()
        batch = make_batch(MIXED[:3], 4)
        cpu, ref = CpuAttention(4, 2, 32, 0.2), ReferenceAttention(4, 2, 32, 0.2)
        ref_cache, cpu_cache = new_caches(batch, cpu, 2, 32, torch.float32)
        fill_caches(batch, ref_cache, cpu_cache, cpu, 2, 32, torch.float32)
        q, k, v = qkv(batch, 4, 2, 32, torch.float32)
        assert torch.equal(cpu.forward(q, k, v, cpu_cache, batch.meta),
                           ref.forward(q, k, v, ref_cache, batch.meta))
        monkeypatch.setenv("HERON_CPU_ATTENTION", "native")
        with pytest.raises(RuntimeError, match="gcc not found"):
            CpuAttention(4, 2, 32, 0.2)
    finally:
        cpu_mod._load_kernel.cache_clear()


def test_kernel_file_name_hashes_source_and_flags(tmp_path, monkeypatch):
    if cbuild.shutil.which("gcc") is None:
        pytest.skip("no gcc")
    monkeypatch.setenv("HERON_CACHE_DIR", str(tmp_path))
    flags = ["-O0", "-fopenmp", "-fPIC", "-shared", "-std=gnu11", "-Wno-psabi"]   # quick to build
    first = cbuild.compile_library("gcc", cpu_mod._SOURCE, flags)
    assert first.parent == tmp_path / "kernels" and first.exists()
    built = first.stat().st_mtime_ns
    assert cbuild.compile_library("gcc", cpu_mod._SOURCE, flags) == first and first.stat().st_mtime_ns == built
    assert cbuild.library_path(cpu_mod._SOURCE, flags + ["-DPF_AHEAD=2"]) != first
    assert not list((tmp_path / "kernels").glob("*.tmp"))


@pytest.fixture
def portable_kernel(monkeypatch):
    """The build for CPUs without AVX-512 (plain GCC vector code), instead of the native one."""
    monkeypatch.setattr(cpu_mod, "_FLAG_SETS", (cpu_mod._FLAG_SETS[-1],))
    cpu_mod._load_kernel.cache_clear()
    try:
        lib, why = cpu_mod._load_kernel()
        if lib is None:
            pytest.skip(why)
        assert lib.heron_attention_isa() == 0
        yield
    finally:
        cpu_mod._load_kernel.cache_clear()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_portable_build_matches_reference(portable_kernel, dtype):
    *_, expected, got = run_both(MIXED + [(300, 1), (0, 70)], 16, 6, 2, 64, dtype)
    torch.testing.assert_close(got.float(), expected.float(), **tolerance(dtype))
