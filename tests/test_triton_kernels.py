"""The Triton attention kernels against ReferenceAttention on random paged batches.

On CI the kernels run in Triton's interpreter on CPU tensors: TRITON_INTERPRET=1 is
set (heron.kernels.triton_kernels.interpret) while the kernel modules are first
imported and, through an autouse fixture, while this file's tests run; it is
restored in between, so that it does not leak into other test files. On a GPU machine
`HERON_TRITON_TEST_DEVICE=cuda` runs the same tests compiled, on cuda tensors
(benchmarks/gpu_check.sh does).

Every cache and output starts poisoned with NaN: an unwritten output element or a
read of an unwritten slot shows. The interpreter does no bounds checking, so the
batches keep spare blocks and a padded block table, as the runner does.
"""
from __future__ import annotations

import importlib.util
import os

import pytest
import torch

DEVICE = os.environ.get("HERON_TRITON_TEST_DEVICE", "cpu")

if importlib.util.find_spec("triton") is None:
    pytest.skip("triton is not installed (pip install -e '.[test]' installs it on Linux x86_64)",
                allow_module_level=True)
if DEVICE == "cpu":
    from heron.kernels.triton_kernels.interpret import interpreted, is_interpreted

    with interpreted():
        from heron.kernels.triton_kernels import attention as _attention
        from heron.kernels.triton_kernels import cache_write as _cache_write  # noqa: F401
    import triton.language.standard as _tl_standard
    if not (is_interpreted(_attention.paged_attention_kernel)
            and is_interpreted(_tl_standard.cdiv)):
        raise RuntimeError("triton (or heron's kernels) was imported in this process before "
                           "TRITON_INTERPRET=1 could be set; the interpreter needs it from the "
                           "first import: run tests/test_triton_kernels.py in its own process")

from heron.kernels.interface import AttentionMetadata
from heron.kernels.reference import ReferenceAttention, gather_context, write_kv
from heron.kernels.triton_attention import TritonAttention
from model_utils import shuffled_block_metadata

# (context already cached, new tokens) per sequence: decodes, fresh prefills and
# prefill chunks over a cached context, lengths that leave partial last blocks.
MIXED = [(37, 1), (0, 19), (50, 13), (1, 1), (0, 1), (70, 1), (16, 16), (5, 40)]
DECODES = [(37, 1), (1, 1), (0, 1), (129, 1), (16, 1), (90, 1)]


def make_meta(specs: list[tuple[int, int]], block_size: int, seed: int) -> tuple[AttentionMetadata, int]:
    """Metadata for sequences (context, new tokens) on shuffled blocks of DEVICE (block 0
    unused, spare blocks left over, table rows padded with 0); returns it and the block count."""
    return shuffled_block_metadata(specs, block_size, seed, device=DEVICE, table_padding=2)


def context_slots(meta: AttentionMetadata, specs: list[tuple[int, int]]) -> torch.Tensor:
    bs, table = meta.block_size, meta.block_tables.cpu()
    return torch.tensor([int(table[i, p // bs]) * bs + p % bs
                         for i, (ctx, _) in enumerate(specs) for p in range(ctx)],
                        dtype=torch.int64, device=DEVICE)


def tolerance(dtype: torch.dtype) -> dict[str, float]:
    # 16-bit: probabilities are rounded to the cache dtype for P @ V, as flash attention does
    if dtype == torch.float32:
        return {"atol": 2e-5, "rtol": 2e-5} if DEVICE == "cpu" else {"atol": 1e-4, "rtol": 1e-4}
    return {"atol": 2e-2, "rtol": 2e-2}


def run_both(specs, block_size, num_heads, num_kv_heads, head_size, dtype, splits=None,
             seed=0):
    """One batch through both backends on NaN-poisoned caches holding the same random
    context: (meta, reference cache, triton cache, reference output, triton output)."""
    meta, num_blocks = make_meta(specs, block_size, seed)
    scale = head_size ** -0.5
    ref = ReferenceAttention(num_heads, num_kv_heads, head_size, scale)
    tri = TritonAttention(num_heads, num_kv_heads, head_size, scale)
    tri.num_splits_override = splits
    shape = TritonAttention.kv_cache_shape(num_blocks, block_size, num_kv_heads, head_size)
    assert shape == ReferenceAttention.kv_cache_shape(num_blocks, block_size, num_kv_heads,
                                                      head_size)
    ref_cache = torch.full(shape, float("nan"), dtype=dtype, device=DEVICE)
    g = torch.Generator().manual_seed(seed + 1)
    slots = context_slots(meta, specs)
    ctx_k, ctx_v = (torch.randn(len(slots), num_kv_heads, head_size, generator=g).to(dtype)
                    .to(DEVICE) for _ in range(2))
    write_kv(ref_cache, ctx_k, ctx_v, slots)
    tri_cache = ref_cache.clone()
    t = meta.num_tokens
    q, k, v = (torch.randn(t, h, head_size, generator=g).to(dtype).to(DEVICE)
               for h in (num_heads, num_kv_heads, num_kv_heads))
    expected = ref.forward(q, k, v, ref_cache, meta)
    got = tri.forward(q, k, v, tri_cache, meta)
    return meta, ref_cache, tri_cache, expected, got


def check(specs, block_size, num_heads, num_kv_heads, head_size, dtype, splits=None, seed=0):
    meta, ref_cache, tri_cache, expected, got = run_both(
        specs, block_size, num_heads, num_kv_heads, head_size, dtype, splits, seed)
    assert got.dtype == expected.dtype and got.shape == expected.shape
    assert not got.isnan().any(), "an output element was never written (or read a NaN slot)"
    torch.testing.assert_close(got.float(), expected.float(), **tolerance(dtype))
    # The write kernel stored exactly what the reference stores, and nothing else.
    assert torch.equal(tri_cache.isnan(), ref_cache.isnan())
    assert torch.equal(tri_cache.nan_to_num(), ref_cache.nan_to_num())
    for i, seq_len in enumerate(meta.seq_lens_cpu):
        k, v = gather_context(tri_cache, meta.block_tables[i], seq_len, block_size)
        assert not (k.isnan().any() or v.isnan().any())


@pytest.fixture(autouse=True, scope="module")
def _interpreter():
    if DEVICE != "cpu":
        yield
        return
    with interpreted():
        yield


DTYPES = [torch.bfloat16, torch.float16, torch.float32]
DTYPE_IDS = ["bf16", "f16", "f32"]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "f32"])
@pytest.mark.parametrize("heads", [(4, 4), (6, 2), (8, 2)], ids=["mha", "gqa3", "gqa4"])
@pytest.mark.parametrize("block_size", [1, 4, 16, 32])
def test_mixed_batch_matches_reference(block_size, heads, dtype):
    check(MIXED, block_size, *heads, 32, dtype, seed=block_size)


@pytest.mark.parametrize("heads", [(4, 4), (8, 2)], ids=["mha", "gqa4"])
def test_float16(heads):
    check(MIXED, 8, *heads, 64, torch.float16, seed=11)


@pytest.mark.parametrize("head_size", [16, 48, 64, 128])
def test_head_sizes(head_size):
    # 48 is not a power of two: the kernels pad to 64 and mask the rest
    check(MIXED[:4], 16, 4, 2, head_size, torch.bfloat16, seed=head_size)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("splits", [2, 3, 8])
@pytest.mark.parametrize("block_size", [8, 16])
def test_split_decode_matches_reference(block_size, splits, dtype):
    # 8 splits of sequences a few tiles long leave some splits empty: the reduce weighs them 0
    check(DECODES, block_size, 8, 2, 32, dtype, splits=splits, seed=splits)


def test_split_path_is_correct_for_prefill_chunks_too():
    check(MIXED, 16, 6, 2, 32, torch.bfloat16, splits=4)


def test_long_context_decode_chooses_splits():
    meta, _ = make_meta([(600, 1), (1000, 1)], 16, 0)
    tri = TritonAttention(8, 2, 32, 0.2)
    assert tri.num_splits(meta, torch.device("cpu")) > 1
    check([(600, 1), (1000, 1)], 16, 8, 2, 32, torch.bfloat16)
    meta, _ = make_meta(MIXED, 16, 0)
    assert tri.num_splits(meta, torch.device("cpu")) == 1   # prefill in the batch


def test_group_wider_than_a_tile():
    # 32 query heads on one kv head: BLOCK_M grows to the group
    check([(20, 3), (9, 1)], 16, 32, 1, 16, torch.float16)


def test_one_token_batches_and_first_token():
    check([(0, 1)], 16, 4, 2, 32, torch.bfloat16)
    check([(0, 1), (0, 1)], 4, 4, 1, 32, torch.float32)


def test_fused_qkv_views_and_other_query_dtype():
    meta, num_blocks = make_meta(MIXED, 16, 3)
    hq, hk, d = 6, 2, 32
    ref, tri = ReferenceAttention(hq, hk, d, 0.17), TritonAttention(hq, hk, d, 0.17)
    shape = ReferenceAttention.kv_cache_shape(num_blocks, 16, hk, d)
    slots = context_slots(meta, MIXED)
    ref_cache = torch.full(shape, float("nan"), dtype=torch.bfloat16, device=DEVICE)
    write_kv(ref_cache, torch.randn(len(slots), hk, d, device=DEVICE),
             torch.randn(len(slots), hk, d, device=DEVICE), slots)
    tri_cache = ref_cache.clone()
    fused = torch.randn(meta.num_tokens, (hq + 2 * hk) * d, device=DEVICE)   # float32
    q, k, v = fused.split([hq * d, hk * d, hk * d], dim=-1)
    q, k, v = q.view(-1, hq, d), k.view(-1, hk, d), v.view(-1, hk, d)
    assert not q.is_contiguous()
    got = tri.forward(q, k, v, tri_cache, meta)
    want = ref.forward(q, k, v, ref_cache, meta)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, **tolerance(torch.bfloat16))
    # float32 keys rounded to the bfloat16 cache: the interpreter may round the last bit
    # differently from torch
    assert torch.equal(tri_cache.isnan(), ref_cache.isnan())
    torch.testing.assert_close(tri_cache.nan_to_num().float(), ref_cache.nan_to_num().float(),
                               atol=0, rtol=2 ** -7)


def test_negative_slots_are_skipped():
    meta, num_blocks = make_meta([(0, 4)], 4, 0)
    tri = TritonAttention(2, 2, 16, 0.25)
    cache = torch.full(tri.kv_cache_shape(num_blocks, 4, 2, 16), float("nan"), device=DEVICE)
    slots = meta.slot_mapping.clone()
    slots[1] = -1
    tri.write_kv(cache, torch.ones(4, 2, 16, device=DEVICE), torch.ones(4, 2, 16, device=DEVICE),
                 slots)
    assert int((~cache.isnan()).sum()) == 3 * 2 * 2 * 16


def test_rejects_a_foreign_cache_layout():
    meta, num_blocks = make_meta([(0, 2)], 4, 0)
    tri = TritonAttention(2, 2, 16, 0.25)
    cache = torch.zeros(num_blocks, 2, 2, 4, 16, device=DEVICE)   # the cpu backend's layout
    with pytest.raises(ValueError, match="KV cache of shape"):
        tri.forward(*(torch.zeros(2, 2, 16, device=DEVICE),) * 3, cache, meta)


def test_batch_invariance():
    """A sequence's output alone equals its output inside a mixed batch, bit for bit, when
    the batch uses the same tiles (same max_query_len class)."""
    meta, num_blocks = make_meta(MIXED, 16, 5)
    tri = TritonAttention(6, 2, 32, 0.2)
    cache = torch.randn(tri.kv_cache_shape(num_blocks, 16, 2, 32), device=DEVICE).bfloat16()
    q = torch.randn(meta.num_tokens, 6, 32, device=DEVICE).bfloat16()
    full = tri.attend(q, cache, meta)
    for i in (1, 2, 7):   # prefill rows: same tiles alone
        a, b = meta.query_start_loc_cpu[i], meta.query_start_loc_cpu[i + 1]
        alone = AttentionMetadata(
            num_seqs=1, num_tokens=b - a,
            query_start_loc=torch.tensor([0, b - a], dtype=torch.int32, device=DEVICE),
            seq_lens=meta.seq_lens[i:i + 1].clone(), block_tables=meta.block_tables[i:i + 1].clone(),
            slot_mapping=meta.slot_mapping[a:b].clone(), max_query_len=b - a,
            max_seq_len=meta.seq_lens_cpu[i], block_size=16, query_start_loc_cpu=[0, b - a],
            seq_lens_cpu=[meta.seq_lens_cpu[i]])
        assert torch.equal(tri.attend(q[a:b], cache, alone), full[a:b])


@pytest.mark.skipif(DEVICE != "cpu", reason="the GPU check runs its own end-to-end comparison")
def test_tiny_model_generates_like_hf_through_the_kernels(tiny_llama, monkeypatch):
    """A whole engine (prefix cache, chunked prefill of 8-token steps, mixed batches) on
    the cpu platform with its attention swapped for the triton backend."""
    from conftest import hf_greedy

    from heron import LLM, SamplingParams
    from heron.platforms.cpu.platform import CpuPlatform

    monkeypatch.setattr(CpuPlatform, "attention_backend",
                        lambda self, dtype, head_size: TritonAttention)
    prompts = [[5, 9, 17, 33, 62], list(range(3, 30)), [7]]
    llm = LLM(tiny_llama, device="cpu", dtype="float32", block_size=4, max_num_batched_tokens=16,
              max_model_len=64)
    assert llm.llm_engine.executor.runner.backend.name == "triton"
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    for prompt, output in zip(prompts, outputs):
        assert output.outputs[0].token_ids == hf_greedy(tiny_llama, prompt, 6)[0]
