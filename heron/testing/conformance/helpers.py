"""Small helpers shared by the suite's tests."""
from __future__ import annotations

import random
from typing import Any, Sequence

from heron import SamplingParams

GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)


def random_prompts(n: int, seed: int, min_len: int = 1, max_len: int = 48) -> list[list[int]]:
    """`n` prompts of random token ids (3..255) and random lengths."""
    rng = random.Random(seed)
    return [[rng.randrange(3, 256) for _ in range(rng.randint(min_len, max_len))]
            for _ in range(n)]


def greedy(llm: Any, prompts: Sequence[list[int]],
           params: SamplingParams | Sequence[SamplingParams] = GREEDY) -> list[list[int]]:
    """Generated token ids per prompt, in prompt order."""
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outputs]


def run_to_end(engine: Any) -> dict[str, Any]:
    """Step `engine` until it has no unfinished request; the finished outputs by request id."""
    done = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out
    return done


def greedy_with_logprobs(llm: Any, prompts: Sequence[list[int]],
                         params: SamplingParams | Sequence[SamplingParams] = GREEDY
                         ) -> list[tuple[list[int], list[float]]]:
    """Per prompt: the generated token ids and each one's log-probability, exactly as
    returned (the floats are compared bit for bit by the invariance tests)."""
    def with_logprobs(p: SamplingParams) -> SamplingParams:
        return p.clone(logprobs=0)
    params = (with_logprobs(params) if isinstance(params, SamplingParams)
              else [with_logprobs(p) for p in params])
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    result = []
    for o in outputs:
        completion = o.outputs[0]
        chosen = [step[token].logprob for token, step in zip(completion.token_ids,
                                                              completion.logprobs)]
        result.append((list(completion.token_ids), chosen))
    return result
