"""Bit-exact greedy output under the scheduling changes a platform declares invariant.

`Capabilities.invariances` lists them and `Capabilities.invariant_dtypes` the dtypes in
which they hold. Each declared pair is checked here against the prompt run alone:
the same tokens and the same log-probability for every token, bit for bit (equal
tokens alone would let a kernel whose numbers move with the batch pass whenever no
near-tie happens to flip). A platform that declares nothing skips these tests; the
token-level checks of test_batching.py still apply to it.
"""
from __future__ import annotations

from typing import Any, Callable

import pytest

from heron.platforms.interface import Invariance, Platform
from heron.testing.conformance.helpers import GREEDY, greedy_with_logprobs, random_prompts

PROMPTS = random_prompts(10, seed=5, min_len=8, max_len=60)
SHARED = list(range(100, 140))
VARIANTS = [SHARED + p[:6] for p in PROMPTS[:6]]
DTYPES = ("float32", "bfloat16", "float16")


def declared(platform: Platform, invariance: Invariance, dtype: str) -> None:
    caps = platform.capabilities
    if invariance not in caps.invariances or dtype not in caps.invariant_dtypes:
        pytest.skip(f"{platform.name} does not declare {invariance.value} invariance "
                    f"in {dtype}")


@pytest.fixture(scope="module")
def alone(make_llm: Callable[..., Any]) -> Callable[[str, list[list[int]]], list[Any]]:
    """alone(dtype, prompts): each prompt run by itself, without prefix caching (cached)."""
    engines: dict[str, Any] = {}
    results: dict[tuple[str, tuple[int, ...]], Any] = {}

    def run(dtype: str, prompts: list[list[int]]) -> list[Any]:
        if dtype not in engines:
            engines[dtype] = make_llm(dtype=dtype, enable_prefix_caching=False)
        for p in prompts:
            if (dtype, tuple(p)) not in results:
                results[dtype, tuple(p)] = greedy_with_logprobs(engines[dtype], [p])[0]
        return [results[dtype, tuple(p)] for p in prompts]
    return run


@pytest.mark.parametrize("dtype", DTYPES)
def test_batched_equals_alone_bit_for_bit(make_llm, platform, alone, dtype) -> None:
    declared(platform, Invariance.BATCH, dtype)
    llm = make_llm(dtype=dtype, enable_prefix_caching=False)
    # Different lengths to generate, so that prefills and decodes share steps.
    params = [GREEDY.clone(max_tokens=12 if i % 3 else 5) for i in range(len(PROMPTS))]
    got = greedy_with_logprobs(llm, PROMPTS, params)
    expected = [(t[:p.max_tokens], lp[:p.max_tokens])
                for (t, lp), p in zip(alone(dtype, PROMPTS), params)]
    assert got == expected


@pytest.mark.parametrize("dtype", DTYPES)
def test_chunked_prefill_equals_whole_bit_for_bit(make_llm, platform, alone, dtype) -> None:
    declared(platform, Invariance.CHUNKED_PREFILL, dtype)
    llm = make_llm(dtype=dtype, enable_prefix_caching=False, max_num_batched_tokens=16,
                   max_num_seqs=3)
    got = [greedy_with_logprobs(llm, [p])[0] for p in PROMPTS]   # alone, but in chunks
    assert got == alone(dtype, PROMPTS)


@pytest.mark.parametrize("dtype", DTYPES)
def test_prefix_cache_hit_equals_miss_bit_for_bit(make_llm, platform, alone, dtype) -> None:
    declared(platform, Invariance.PREFIX_CACHE, dtype)
    llm = make_llm(dtype=dtype, enable_prefix_caching=True, block_size=4)
    first = [greedy_with_logprobs(llm, [v])[0] for v in VARIANTS]   # each hits the previous
    again = [greedy_with_logprobs(llm, [v])[0] for v in VARIANTS]   # whole prompts cached
    expected = alone(dtype, VARIANTS)
    assert first == expected and again == expected
    assert llm.llm_engine.scheduler.kv.stats.hits > 0, "the prefix cache was never hit"


@pytest.mark.parametrize("dtype", DTYPES)
def test_preempted_equals_alone_bit_for_bit(make_llm, platform, alone, dtype) -> None:
    declared(platform, Invariance.PREEMPTION, dtype)
    caps = platform.capabilities
    block_size = min(caps.block_sizes) if caps.block_sizes else 4
    num_blocks = max(-(-72 // block_size), 100 // block_size)
    llm = make_llm(dtype=dtype, enable_prefix_caching=False, block_size=block_size,
                   num_gpu_blocks_override=num_blocks, max_model_len=72)
    assert greedy_with_logprobs(llm, PROMPTS) == alone(dtype, PROMPTS)
    assert llm.llm_engine.scheduler.num_preemptions > 0, "the KV cache was meant to be too small"
