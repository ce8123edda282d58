"""The executor the engine runs on this platform, and the tensor-parallel claim.

A platform may bring its own executor (`Platform.executor_class()`); the engine must
then run it, and it must follow heron's executor contract. A platform that declares
`tensor_parallel` must give the same greedy tokens over two ranks as over one; one that
does not must refuse two ranks with a reason.
"""
from __future__ import annotations

from typing import Any, Callable

import pytest

from heron.platforms.interface import Platform
from heron.testing.conformance.helpers import greedy, random_prompts
from heron.worker.executor import Executor, UniProcExecutor


def test_engine_runs_the_platforms_executor(make_llm: Callable[..., Any],
                                            platform: Platform) -> None:
    own = platform.executor_class()
    llm = make_llm()
    executor = llm.llm_engine.executor
    assert isinstance(executor, own or UniProcExecutor)
    assert isinstance(executor, Executor)
    assert greedy(llm, [[5, 9, 17]])[0], "the executor produced no tokens"
    llm.shutdown()
    llm.shutdown()   # twice is allowed


def test_tensor_parallel_claim_holds(make_llm: Callable[..., Any], platform: Platform) -> None:
    if not platform.capabilities.tensor_parallel:
        with pytest.raises(ValueError, match="tensor_parallel_size"):
            make_llm(tensor_parallel_size=2)
        return
    prompts = random_prompts(4, seed=11, max_len=30)
    one = greedy(make_llm("qwen2"), prompts)
    two_ranks = make_llm("qwen2", tensor_parallel_size=2)
    try:
        assert greedy(two_ranks, prompts) == one
    finally:
        two_ranks.shutdown()
