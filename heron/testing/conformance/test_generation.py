"""Greedy output equal to Hugging Face; every declared dtype loads and runs."""
from __future__ import annotations

from typing import Any, Callable

import pytest

from heron import SamplingParams
from heron.platforms.interface import Platform
from heron.testing.conformance.helpers import greedy
from heron.testing.conformance.models import VOCAB_SIZE, hf_greedy

PROMPTS = [[7], [5, 9, 17, 33, 62, 101, 4], list(range(3, 43))]
MAX_TOKENS = 16


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_greedy_matches_hugging_face(make_llm: Callable[..., Any], tiny_models: Any,
                                     family: str) -> None:
    llm = make_llm(family, block_size=4)
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)
    got = greedy(llm, PROMPTS, params)
    for prompt, tokens in zip(PROMPTS, got):
        assert tokens == hf_greedy(tiny_models[family], prompt, MAX_TOKENS), \
            f"{family}, prompt of {len(prompt)} tokens"


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_declared_dtypes_run_and_others_are_refused(make_llm: Callable[..., Any],
                                                    platform: Platform, dtype: str) -> None:
    if dtype not in platform.capabilities.dtypes:
        with pytest.raises(ValueError, match=dtype):
            make_llm(dtype=dtype)
        return
    llm = make_llm(dtype=dtype)
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True, logprobs=0)
    outputs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], params, use_tqdm=False)
    for output in outputs:
        completion = output.outputs[0]
        assert len(completion.token_ids) == 8
        assert all(0 <= t < VOCAB_SIZE for t in completion.token_ids)
        logprobs = [pos[t].logprob for pos, t in zip(completion.logprobs, completion.token_ids)]
        assert all(lp <= 0.0 and lp > float("-inf") for lp in logprobs), logprobs
