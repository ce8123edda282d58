"""A scheduled step in a compact, picklable form, for ranks in other processes.

The scheduler's `SchedulerOutput` points at the engine's `Request` objects, whose token
lists grow with every step. Sending them whole to each worker every step would cost
time proportional to the total context. Instead, as in vLLM v1, each worker keeps a
mirror of every running request (`RequestMirrors`): a request's prompt and sampling
parameters travel once, and afterwards only the tokens the worker has not seen yet,
the step's token count and the block table. The mirrors are real `Request` objects, so
the worker hands the model runner an ordinary `SchedulerOutput`, and the sampler sees
exactly the token history (penalties) and per-request generator (seeds) it would see in
the engine's process.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from heron.core.request import Request
from heron.core.sampling_params import SamplingParams
from heron.core.scheduler import ScheduledRequest, SchedulerOutput


@dataclass
class NewRequest:
    """A request a worker has not seen: what does not change while it runs."""
    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams


@dataclass
class StepItem:
    """One request's share of the step."""
    request_id: str
    num_computed_tokens: int
    num_new_tokens: int
    appended_token_ids: list[int]   # output tokens the worker's mirror lacks so far
    block_ids: list[int]
    num_spec_tokens: int = 0        # tentative tokens at the end of the step's chunk
    spec_token_ids: list[int] = field(default_factory=list)


@dataclass
class StepMessage:
    """Everything a worker needs to run one step; the same bytes go to every rank."""
    new_requests: list[NewRequest] = field(default_factory=list)
    items: list[StepItem] = field(default_factory=list)
    finished_ids: list[str] = field(default_factory=list)


class StepEncoder:
    """The engine's side: turns `SchedulerOutput`s into `StepMessage`s, remembering how
    much of each request the workers hold."""

    def __init__(self) -> None:
        # request id -> (the engine's Request object, tokens the workers have of it)
        self._sent: dict[str, tuple[Request, int]] = {}

    def encode(self, sched: SchedulerOutput) -> StepMessage:
        message = StepMessage(finished_ids=list(sched.finished_ids))
        for request_id in sched.finished_ids:
            self._sent.pop(request_id, None)
        for item in sched.scheduled:
            request = item.request
            known = self._sent.get(request.request_id)
            if known is None or known[0] is not request:   # new, or an id used again
                message.new_requests.append(NewRequest(
                    request.request_id, list(request.prompt_token_ids), request.sampling_params))
                sent = request.num_prompt_tokens
            else:
                sent = known[1]
            self._sent[request.request_id] = (request, request.num_tokens)
            message.items.append(StepItem(request.request_id, item.start, item.num_new_tokens,
                                          request.all_token_ids[sent:], list(item.block_ids),
                                          item.num_spec_tokens, list(item.spec_token_ids)))
        return message

    def forget(self) -> None:
        """Drop all state (the workers are gone)."""
        self._sent.clear()


class RequestMirrors:
    """A worker's side: the requests it runs, rebuilt into `SchedulerOutput`s."""

    def __init__(self) -> None:
        self.requests: dict[str, Request] = {}

    def decode(self, message: StepMessage) -> SchedulerOutput:
        for request_id in message.finished_ids:
            self.requests.pop(request_id, None)
        for new in message.new_requests:
            self.requests[new.request_id] = Request(new.request_id, new.prompt_token_ids,
                                                    new.sampling_params)
        scheduled = []
        for item in message.items:
            request = self.requests[item.request_id]
            for token_id in item.appended_token_ids:
                request.append_output_token(token_id)
            request.num_computed_tokens = item.num_computed_tokens
            scheduled.append(ScheduledRequest(request, item.num_new_tokens, item.block_ids,
                                              item.num_spec_tokens, item.spec_token_ids))
        return SchedulerOutput(scheduled=scheduled, finished_ids=list(message.finished_ids))
