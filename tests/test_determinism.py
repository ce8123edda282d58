"""Greedy output is a function of the request alone, in the default configuration
(bfloat16, prefix caching on) on the embedded SmolLM2: a prefix from the cache, a
prompt computed in chunks, a batch of other requests and preemption change neither
the tokens nor their log-probabilities, bit for bit.

Runs on the cpu platform only: it is the one that declares these invariances
(heron.testing.conformance checks any platform against what it declares)."""
from __future__ import annotations

import gc

import pytest
import torch

from heron import LLM, SamplingParams
from heron.platforms.interface import ALL_INVARIANCES

pytestmark = pytest.mark.slow

SAY_HELLO = [{"role": "user", "content": "Say hello."}]
QUESTIONS = ["Say hello.", "What is the capital of France?", "Write a haiku about rain.",
             "Name three primary colours.", "Why is the sky blue?", "Count from one to ten.",
             "What does a compiler do?", "Give me a synonym for happy.",
             "Translate 'good morning' into Spanish.", "What is 12 times 12?",
             "Describe a cat in one sentence.", "List two uses of copper."]
GREEDY = SamplingParams(temperature=0, max_tokens=24, logprobs=0)


def answers(llm: LLM, conversations, params=GREEDY):
    """(token ids, each token's log-probability) per conversation."""
    outs = llm.chat(conversations, params, use_tqdm=False)
    result = []
    for o in outs:
        c = o.outputs[0]
        result.append((list(c.token_ids), [lp[t].logprob for t, lp in zip(c.token_ids,
                                                                           c.logprobs)]))
    return result


def conversations(questions=QUESTIONS):
    return [[{"role": "user", "content": q}] for q in questions]


@pytest.fixture(scope="module")
def cpu_llm(smollm2_path):
    llm = LLM(smollm2_path, device="cpu", max_model_len=512)   # the defaults otherwise
    assert llm.llm_engine.executor.runner.dtype == torch.bfloat16   # the default for SmolLM2
    platform = llm.llm_engine.platform
    assert platform.capabilities.invariances == ALL_INVARIANCES
    assert "bfloat16" in platform.capabilities.invariant_dtypes
    yield llm
    del llm
    gc.collect()


@pytest.fixture(scope="module")
def alone(smollm2_path):
    """Each conversation by itself, nothing cached, nothing chunked."""
    llm = LLM(smollm2_path, device="cpu", max_model_len=512, enable_prefix_caching=False)
    result = [answers(llm, [c])[0] for c in conversations()]
    del llm
    gc.collect()
    return result


def test_the_same_chat_twice_hits_the_cache_and_answers_the_same(cpu_llm, alone):
    first = cpu_llm.chat(SAY_HELLO, GREEDY, use_tqdm=False)[0]
    second = cpu_llm.chat(SAY_HELLO, GREEDY, use_tqdm=False)[0]
    assert second.num_cached_tokens > 0, "the second request was meant to hit the cache"
    assert second.outputs[0].text == first.outputs[0].text
    assert answers(cpu_llm, [SAY_HELLO])[0] == alone[0]


def test_batched_with_cache_hits_equals_alone(cpu_llm, alone):
    # The whole set at once: batched prefills and decodes, and the chat template's
    # system prefix shared through the cache.
    assert answers(cpu_llm, conversations()) == alone
    # Different lengths to generate, so that the set's decodes mix with prefills.
    params = [GREEDY.clone(max_tokens=24 if i % 3 else 9) for i in range(len(QUESTIONS))]
    got = answers(cpu_llm, conversations(), params)
    assert got == [(t[:p.max_tokens], lp[:p.max_tokens]) for (t, lp), p in zip(alone, params)]


def test_chunked_and_preempted_equals_alone(smollm2_path, alone):
    # 16-token chunks, and a KV cache of 16 blocks of 16 tokens for 12 requests of
    # about 60 tokens each (their common chat-template prefix shared through the cache).
    llm = LLM(smollm2_path, device="cpu", max_model_len=256, max_num_batched_tokens=16,
              block_size=16, num_gpu_blocks_override=16)
    try:
        assert answers(llm, conversations()) == alone
        assert llm.llm_engine.scheduler.num_preemptions > 0
    finally:
        del llm
        gc.collect()
