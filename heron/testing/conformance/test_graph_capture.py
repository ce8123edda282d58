"""A platform's compiled forward (`Capabilities.graph_capture`) computes what the eager
model computes: greedy tokens equal in float32, on prompts long enough to mix prefill
chunks and decodes in a step. Where the platform also declares batch invariance in a
dtype, the log-probabilities must be equal bit for bit too (both paths then run the
same kernels in the same order)."""
from __future__ import annotations

import pytest

from heron.platforms.interface import Invariance
from heron.testing.conformance.helpers import greedy_with_logprobs, random_prompts

PROMPTS = random_prompts(6, seed=11, min_len=5, max_len=70)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_compiled_forward_equals_eager(make_llm, platform, family) -> None:
    if not platform.capabilities.graph_capture:
        pytest.skip(f"{platform.name} declares no graph_capture")
    dtype = "float32"
    compiled = greedy_with_logprobs(make_llm(family, dtype=dtype), PROMPTS)
    eager = greedy_with_logprobs(make_llm(family, dtype=dtype, enforce_eager=True), PROMPTS)
    assert [tokens for tokens, _ in compiled] == [tokens for tokens, _ in eager]
    caps = platform.capabilities
    if Invariance.BATCH in caps.invariances and dtype in caps.invariant_dtypes:
        assert compiled == eager

