"""The scheduler: continuous batching under a token budget, with no prefill/decode phases.

Each step it closes the gap between each request's computed tokens and its known
tokens, running requests first, then waiting ones, within `max_num_batched_tokens`
tokens and `max_num_seqs` requests. A prompt longer than the budget is computed in
chunks over several steps (chunked prefill). When blocks run out, the most recently
admitted running request is preempted: its blocks are freed and it goes back to the
front of the waiting queue, to be recomputed later with everything it has generated.
"""
from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

from heron.config import CacheConfig, SchedulerConfig
from heron.core.kv_cache_manager import KVCacheManager
from heron.core.request import PositionLogprobs, Request, RequestStatus


@dataclass
class ScheduledRequest:
    """One request's share of a step: compute `num_new_tokens` tokens after its computed ones."""
    request: Request
    num_new_tokens: int
    block_ids: list[int]

    @property
    def start(self) -> int:
        """Position of the first token computed this step."""
        return self.request.num_computed_tokens

    @property
    def completes_sequence(self) -> bool:
        """True when this step reaches the last known token, so a new token is sampled."""
        return self.start + self.num_new_tokens == self.request.num_tokens


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledRequest] = field(default_factory=list)
    preempted_ids: list[str] = field(default_factory=list)
    finished_ids: list[str] = field(default_factory=list)  # finished since the last step run

    @property
    def num_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


@dataclass
class ModelRunnerOutput:
    """What one forward pass produced, by request id."""
    sampled_token_ids: dict[str, int] = field(default_factory=dict)
    logprobs: dict[str, PositionLogprobs] = field(default_factory=dict)
    sampled_logprob: dict[str, float] = field(default_factory=dict)
    prompt_logprobs: dict[str, list[PositionLogprobs]] = field(default_factory=dict)


class Scheduler:
    def __init__(self, scheduler_config: SchedulerConfig, cache_config: CacheConfig,
                 num_blocks: int, max_model_len: int) -> None:
        self.config = scheduler_config
        self.max_model_len = max_model_len
        self.kv = KVCacheManager(num_blocks, cache_config.block_size,
                                 cache_config.enable_prefix_caching)
        self.requests: dict[str, Request] = {}
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self._finished_ids: list[str] = []
        self.num_preemptions = 0

    # -- queue management -------------------------------------------------------------

    def add_request(self, request: Request) -> None:
        self.requests[request.request_id] = request
        self.waiting.append(request)

    def finish_requests(self, request_ids: list[str], status: RequestStatus) -> list[Request]:
        """End requests from outside (abort, or a stop string found by the detokenizer)."""
        finished = []
        for request_id in request_ids:
            request = self.requests.get(request_id)
            if request is None or request.is_finished:
                continue
            if request.status == RequestStatus.RUNNING:
                self.running.remove(request)
            else:
                self.waiting.remove(request)
            self._finish(request, status)
            finished.append(request)
        return finished

    def _finish(self, request: Request, status: RequestStatus) -> None:
        request.status = status
        self.kv.free(request)
        self.requests.pop(request.request_id, None)
        self._finished_ids.append(request.request_id)

    def has_unfinished_requests(self) -> bool:
        return bool(self.waiting or self.running)

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    # -- one step -----------------------------------------------------------------------

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput(finished_ids=self._finished_ids)
        budget = self.config.max_num_batched_tokens
        budget = self._schedule_running(out, budget)
        if not out.preempted_ids:
            self._schedule_waiting(out, budget)
        if not out.is_empty:
            # An empty step never reaches the model runner: its finished ids wait for the
            # next step that does (workers in other processes free their state by them).
            self._finished_ids = []
        return out

    def _chunk(self, request: Request, budget: int) -> int:
        """How many of the request's uncomputed tokens fit this step."""
        num_new = min(request.num_tokens - request.num_computed_tokens, budget)
        threshold = self.config.long_prefill_token_threshold
        return min(num_new, threshold) if threshold else num_new

    def _schedule_running(self, out: SchedulerOutput, budget: int) -> int:
        index = 0
        while index < len(self.running) and budget > 0:
            request = self.running[index]
            num_new = self._chunk(request, budget)
            if num_new <= 0:
                index += 1
                continue
            # The victim is the last running request, at or after `index`: never one
            # already scheduled in this step.
            while self.kv.allocate_slots(request, num_new) is None:
                victim = self.running.pop()
                self._preempt(victim, out)
                if victim is request:
                    break
            else:
                out.scheduled.append(ScheduledRequest(request, num_new,
                                                      self.kv.block_ids(request.request_id)))
                budget -= num_new
                index += 1
        return budget

    def _preempt(self, request: Request, out: SchedulerOutput) -> None:
        self.kv.free(request)
        request.status = RequestStatus.PREEMPTED
        request.num_computed_tokens = 0
        request.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(request)
        out.preempted_ids.append(request.request_id)

    def _schedule_waiting(self, out: SchedulerOutput, budget: int) -> None:
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            request = self.waiting[0]
            hits, num_cached = self.kv.get_computed_blocks(request)
            num_new = self._chunk_waiting(request, num_cached, budget)
            if num_new == 0:
                break
            if self.kv.allocate_slots(request, num_new, hits) is None:
                break
            self.waiting.popleft()
            request.num_computed_tokens = num_cached
            if request.num_cached_tokens < 0:
                request.num_cached_tokens = num_cached
            if request.first_scheduled_time is None:
                request.first_scheduled_time = time.monotonic()
            request.status = RequestStatus.RUNNING
            self.running.append(request)
            out.scheduled.append(ScheduledRequest(request, num_new,
                                                  self.kv.block_ids(request.request_id)))
            budget -= num_new

    def _chunk_waiting(self, request: Request, num_cached: int, budget: int) -> int:
        num_uncomputed = request.num_tokens - num_cached
        if not self.config.enable_chunked_prefill and num_uncomputed > budget:
            return 0
        saved, request.num_computed_tokens = request.num_computed_tokens, num_cached
        try:
            return self._chunk(request, budget)
        finally:
            request.num_computed_tokens = saved

    # -- after the forward pass ---------------------------------------------------------

    def update_from_output(self, sched: SchedulerOutput,
                           result: ModelRunnerOutput) -> list[tuple[Request, list[int]]]:
        """Advance computed tokens, append sampled tokens, apply token-level stops.

        Returns (request, new token ids) for every request that got a token this step,
        finished or not."""
        updated = []
        for item in sched.scheduled:
            request = item.request
            if request.is_finished:  # aborted while the step ran
                continue
            new_prompt_logprobs = result.prompt_logprobs.get(request.request_id)
            # After a preemption the prompt is recomputed: keep the first copy only.
            if new_prompt_logprobs and len(request.prompt_logprobs or ()) == item.start + 1:
                request.prompt_logprobs.extend(new_prompt_logprobs)
            request.num_computed_tokens += item.num_new_tokens
            token = result.sampled_token_ids.get(request.request_id)
            if token is None:
                continue
            request.append_output_token(token)
            if request.request_id in result.sampled_logprob:
                request.cumulative_logprob += result.sampled_logprob[request.request_id]
            if request.logprobs is not None:
                request.logprobs.append(result.logprobs[request.request_id])
            status = self._check_stop(request, token)
            if status is not None:
                self.running.remove(request)
                self._finish(request, status)
            updated.append((request, [token]))
        return updated

    def _check_stop(self, request: Request, token: int) -> RequestStatus | None:
        params = request.sampling_params
        if request.num_output_tokens >= params.min_tokens:
            if not params.ignore_eos and token in params.eos_token_ids:
                return RequestStatus.FINISHED_STOPPED
            if token in params.stop_token_ids:
                request.stop_reason = token
                return RequestStatus.FINISHED_STOPPED
        if (request.num_output_tokens >= request.max_tokens
                or request.num_tokens >= self.max_model_len):
            return RequestStatus.FINISHED_LENGTH
        return None
