"""Speculative decoding, as `Capabilities.speculative_decoding` declares: greedy output with
n-gram proposals equals greedy output without; a platform that declares no support
refuses a `speculative_config`."""
from __future__ import annotations

from typing import Any, Callable

import pytest

from heron import SamplingParams
from heron.platforms.interface import Platform
from heron.testing.conformance.helpers import greedy

NGRAM = {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 2,
         "prompt_lookup_min": 1}
# Repeating patterns: n-gram lookup finds proposals; the random model takes some of them.
PROMPTS = [([5, 6, 7, 8] * 8)[:30], [20, 21, 22] * 6, [40, 41, 40, 42] * 5]


def test_speculative_decoding_keeps_greedy_output(make_llm: Callable[..., Any],
                                                  platform: Platform) -> None:
    if not platform.capabilities.speculative_decoding:
        with pytest.raises(ValueError, match="speculative"):
            make_llm(speculative_config=NGRAM)
        return
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    want = greedy(make_llm(), PROMPTS, params)
    llm = make_llm(speculative_config=NGRAM)
    assert greedy(llm, PROMPTS, params) == want
    stats = llm.llm_engine.spec_decoding_stats
    assert stats.num_draft_tokens > 0, "no proposal was verified"
    assert llm.llm_engine.scheduler.kv.num_free_blocks == llm.llm_engine.num_blocks
