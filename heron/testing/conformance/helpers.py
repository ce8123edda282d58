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
