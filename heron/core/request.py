"""A request as the scheduler and KV-cache manager see it."""
from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import Any

from heron.core.sampling_params import SamplingParams


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"
    FINISHED_STOPPED = "stop"
    FINISHED_LENGTH = "length"
    FINISHED_ABORTED = "abort"

    @property
    def finished(self) -> bool:
        return self in (RequestStatus.FINISHED_STOPPED, RequestStatus.FINISHED_LENGTH,
                        RequestStatus.FINISHED_ABORTED)

    @property
    def finish_reason(self) -> str | None:
        """OpenAI's finish_reason: 'stop', 'length', 'abort' or None while running."""
        return self.value if self.finished else None


@dataclass
class Logprob:
    """One candidate token's log-probability, its rank (1 = most likely) and its text."""
    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


# One position's candidates: token id -> Logprob.
PositionLogprobs = dict[int, Logprob]


@dataclass(eq=False)
class Request:
    """One sequence to generate. `n > 1` is fanned out by the engine into n requests."""
    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    prompt: str | None = None
    arrival_time: float = field(default_factory=time.monotonic)
    max_tokens: int = 16  # resolved against max_model_len by the engine
    status: RequestStatus = RequestStatus.WAITING
    output_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    num_cached_tokens: int = -1   # prefix-cache hit at first scheduling; -1 until then
    num_preemptions: int = 0
    stop_reason: int | str | None = None
    cumulative_logprob: float = 0.0
    logprobs: list[PositionLogprobs] | None = None
    prompt_logprobs: list[PositionLogprobs | None] | None = None
    generator: Any = None          # a torch.Generator for seeded sampling, set by the runner
    block_hashes: list[bytes] = field(default_factory=list)
    first_scheduled_time: float | None = None
    first_token_time: float | None = None

    def __post_init__(self) -> None:
        self.all_token_ids = list(self.prompt_token_ids)
        if self.sampling_params.logprobs is not None:
            self.logprobs = []
        if self.sampling_params.prompt_logprobs is not None:
            self.prompt_logprobs = [None]  # the first prompt token has no context

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def is_finished(self) -> bool:
        return self.status.finished

    def append_output_token(self, token_id: int) -> None:
        self.output_token_ids.append(token_id)
        self.all_token_ids.append(token_id)

    def truncate_output(self, num_output_tokens: int) -> None:
        """Drop output tokens after the first `num_output_tokens` (a stop string ended the
        request earlier in a step that emitted several tokens), with their logprobs."""
        dropped = self.output_token_ids[num_output_tokens:]
        if not dropped:
            return
        del self.output_token_ids[num_output_tokens:]
        del self.all_token_ids[self.num_prompt_tokens + num_output_tokens:]
        if self.logprobs is not None:
            for position, token in zip(self.logprobs[num_output_tokens:], dropped):
                if token in position:
                    self.cumulative_logprob -= position[token].logprob
            del self.logprobs[num_output_tokens:]
