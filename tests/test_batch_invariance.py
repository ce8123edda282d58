"""A prompt's greedy output does not depend on what it is batched with, on chunked
prefill, on prefix caching, or on preemption."""
import random

import pytest

from heron import LLM, SamplingParams

GREEDY = SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True)


def mixed_prompts(n: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, 256) for _ in range(rng.randint(1, 70))] for _ in range(n)]


def greedy(llm, prompts, params=GREEDY):
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    return [o.outputs[0].token_ids for o in outs]


@pytest.fixture(scope="module")
def reference(tiny_llama):
    """Each prompt alone, no prefix caching, no chunking."""
    llm = LLM(tiny_llama, dtype="float32", enable_prefix_caching=False)
    prompts = mixed_prompts(24)
    return prompts, [greedy(llm, [p])[0] for p in prompts]


def test_large_mixed_batch(tiny_llama, reference):
    prompts, expected = reference
    llm = LLM(tiny_llama, dtype="float32")
    # Mixed lengths, also different max_tokens so decodes and prefills interleave.
    params = [GREEDY.clone(max_tokens=20 if i % 3 else 7) for i in range(len(prompts))]
    got = greedy(llm, prompts, params)
    for g, e, p in zip(got, expected, params):
        assert g == e[:p.max_tokens]


def test_chunked_prefill(tiny_llama, reference):
    prompts, expected = reference
    llm = LLM(tiny_llama, dtype="float32", max_num_batched_tokens=16, max_num_seqs=5)
    assert greedy(llm, prompts) == expected


def test_prefix_caching(tiny_llama, reference):
    prompts, _ = reference
    llm = LLM(tiny_llama, dtype="float32", block_size=4)
    shared = prompts[1][:30]
    variants = [shared + p[:5] for p in prompts[:8]]
    first = greedy(llm, variants)          # fills the cache (and hits it within the batch)
    hits_before = llm.llm_engine.scheduler.kv.stats.hits
    second = greedy(llm, variants)         # every prompt now hits the cache
    assert llm.llm_engine.scheduler.kv.stats.hits > hits_before
    alone = LLM(tiny_llama, dtype="float32", enable_prefix_caching=False)
    expected = [greedy(alone, [v])[0] for v in variants]
    assert first == expected and second == expected


def test_preemption_under_a_tiny_kv_cache(tiny_llama, reference):
    prompts, expected = reference
    llm = LLM(tiny_llama, dtype="float32", block_size=4, num_gpu_blocks_override=30,
              max_model_len=100)
    assert greedy(llm, prompts) == expected
    assert llm.llm_engine.scheduler.num_preemptions > 0
    assert llm.llm_engine.scheduler.kv.num_free_blocks == 30
