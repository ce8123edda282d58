"""Batch invariance, preemption, chunked prefill and prefix caching where claimed.

A prompt's greedy output must not depend on what it is batched with, on how its
prefill is chunked, on cached prefixes, or on being preempted and recomputed.
"""
from __future__ import annotations

from typing import Any, Callable

import pytest

from heron.platforms.interface import Platform
from heron.testing.conformance.helpers import GREEDY, greedy, random_prompts

PROMPTS = random_prompts(12, seed=3)


@pytest.fixture(scope="module")
def alone(make_llm: Callable[..., Any]) -> list[list[int]]:
    """Each prompt run by itself, without prefix caching."""
    llm = make_llm(enable_prefix_caching=False)
    return [greedy(llm, [p])[0] for p in PROMPTS]


def test_mixed_batch_equals_alone(make_llm: Callable[..., Any], alone: list[list[int]]) -> None:
    llm = make_llm()
    # Different lengths to generate, so that prefills and decodes share steps.
    params = [GREEDY.clone(max_tokens=12 if i % 3 else 5) for i in range(len(PROMPTS))]
    got = greedy(llm, PROMPTS, params)
    assert got == [a[:p.max_tokens] for a, p in zip(alone, params)]


def test_preemption_under_a_tiny_kv_cache(make_llm: Callable[..., Any], platform: Platform,
                                          alone: list[list[int]]) -> None:
    # Room for about 96 tokens (at least one whole 64-token sequence) for a batch of 12.
    block_size = 4 if not platform.capabilities.block_sizes else min(platform.capabilities.block_sizes)
    num_blocks = max(-(-64 // block_size), 96 // block_size)
    llm = make_llm(block_size=block_size, num_gpu_blocks_override=num_blocks, max_model_len=64)
    assert greedy(llm, PROMPTS) == alone
    scheduler = llm.llm_engine.scheduler
    assert scheduler.num_preemptions > 0, "the KV cache was meant to be too small for the batch"


def test_chunked_prefill(make_llm: Callable[..., Any], platform: Platform,
                         alone: list[list[int]]) -> None:
    if not platform.capabilities.chunked_prefill:
        pytest.skip(f"{platform.name} does not claim chunked prefill")
    llm = make_llm(max_num_batched_tokens=16, max_num_seqs=4)
    assert greedy(llm, PROMPTS) == alone


def test_prefix_caching(make_llm: Callable[..., Any], platform: Platform) -> None:
    if not platform.capabilities.prefix_caching:
        with pytest.raises(ValueError, match="prefix caching"):
            make_llm(enable_prefix_caching=True)
        return
    shared = list(range(100, 132))
    variants = [shared + p[:4] for p in PROMPTS[:6]]
    expected = greedy(make_llm(enable_prefix_caching=False), variants)
    llm = make_llm(enable_prefix_caching=True, block_size=4)
    first = greedy(llm, variants)
    outputs = llm.generate([{"prompt_token_ids": v} for v in variants], GREEDY, use_tqdm=False)
    second = [list(o.outputs[0].token_ids) for o in outputs]
    assert first == expected and second == expected
    cached = [o.num_cached_tokens for o in outputs]
    assert all(c >= len(shared) for c in cached), f"prefix cache hits per prompt: {cached}"
