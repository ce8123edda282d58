"""Bad input fails alone with a clear error; the platform goes on serving the others and
gets every KV block back."""
from __future__ import annotations

from typing import Any, Callable

import pytest

from heron import SamplingParams
from heron.testing.conformance.helpers import run_to_end
from heron.testing.conformance.models import VOCAB_SIZE

GREEDY = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)


@pytest.fixture(scope="module")
def engine(make_llm: Callable[..., Any]) -> Any:
    return make_llm(max_model_len=64).llm_engine


@pytest.mark.parametrize("prompt,message", [
    ([], "empty"),
    (list(range(3, 70)), "max_model_len"),
    ([5, VOCAB_SIZE + 7], "outside the vocabulary"),
])
def test_bad_prompt_fails_alone(engine: Any, prompt: Any, message: str) -> None:
    engine.add_request("good-1", {"prompt_token_ids": [5, 6, 7]}, GREEDY)
    with pytest.raises(ValueError, match=message):
        engine.add_request("bad", {"prompt_token_ids": prompt}, GREEDY)
    engine.add_request("good-2", {"prompt_token_ids": [9, 10]}, GREEDY)
    done = run_to_end(engine)
    assert set(done) == {"good-1", "good-2"}
    assert all(len(o.outputs[0].token_ids) == 6 for o in done.values())
    assert engine.scheduler.kv.num_free_blocks == engine.num_blocks


def test_bad_sampling_params_are_refused_before_the_engine() -> None:
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams(temperature=-1.0)


def test_abort_frees_blocks_and_others_finish(engine: Any) -> None:
    engine.add_request("keep", {"prompt_token_ids": [5, 6, 7]}, GREEDY)
    engine.add_request("drop", {"prompt_token_ids": [8, 9, 10]}, GREEDY.clone(max_tokens=50))
    engine.step()
    engine.abort_request("drop")
    done = run_to_end(engine)
    assert set(done) == {"keep"}
    assert engine.scheduler.kv.num_free_blocks == engine.num_blocks
