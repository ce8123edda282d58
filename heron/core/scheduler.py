"""The scheduler: continuous batching under a token budget, with no prefill/decode phases.

Each step it closes the gap between each request's computed tokens and its known
tokens, running requests first, then waiting ones, within `max_num_batched_tokens`
tokens and `max_num_seqs` requests. A prompt longer than the budget is computed in
chunks over several steps (chunked prefill). When blocks run out, the most recently
admitted running request is preempted: its blocks are freed and it goes back to the
front of the waiting queue, to be recomputed later with everything it has generated.

With speculative decoding, a decoding request's step also carries tentative tokens
(proposals) after its last token; the model runner verifies them in the same forward
pass and reports the accepted prefix. Rejected tokens never enter the request's
tokens (so no prefix-cache hash covers them) and the blocks only they used are freed.
"""
from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

from heron.config import CacheConfig, SchedulerConfig, SpeculativeConfig
from heron.core.kv_cache_manager import KVCacheManager
from heron.core.request import PositionLogprobs, Request, RequestStatus
from heron.core.spec_decode.planner import NO_SPECULATION, Speculation, SpeculationPlanner
from heron.core.spec_decode.stats import SpecDecodingStats


@dataclass
class ScheduledRequest:
    """One request's share of a step: compute `num_new_tokens` tokens after its computed ones.

    The last `num_spec_tokens` of them are tentative (proposals to verify): their ids are
    `spec_token_ids`, or, when that is empty, proposed by the worker's draft model."""
    request: Request
    num_new_tokens: int
    block_ids: list[int]
    num_spec_tokens: int = 0
    spec_token_ids: list[int] = field(default_factory=list)

    @property
    def start(self) -> int:
        """Position of the first token computed this step."""
        return self.request.num_computed_tokens

    @property
    def completes_sequence(self) -> bool:
        """True when this step reaches the last known token, so a new token is sampled."""
        return self.start + self.num_new_tokens == self.request.num_tokens + self.num_spec_tokens

    def input_token_ids(self, draft_token_ids: list[int] | None = None) -> list[int]:
        """The tokens this step computes: known ones, then the tentative ones (from
        `spec_token_ids`, or `draft_token_ids` when the worker proposed them)."""
        known_end = self.start + self.num_new_tokens - self.num_spec_tokens
        tokens = self.request.all_token_ids[self.start:known_end]
        if self.num_spec_tokens:
            tokens = tokens + list(draft_token_ids if draft_token_ids is not None
                                   else self.spec_token_ids)
        return tokens


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
class VerifiedDrafts:
    """One request's verified proposals: the accepted prefix (the runner's sampled token
    follows it), with the logprobs of each accepted token when the request asks for them."""
    accepted_token_ids: list[int] = field(default_factory=list)
    logprobs: list[PositionLogprobs] = field(default_factory=list)
    sampled_logprobs: list[float] = field(default_factory=list)


@dataclass
class ModelRunnerOutput:
    """What one forward pass produced, by request id.

    `sampled_token_ids` holds the one token sampled after the last computed position;
    for requests that verified proposals, `verified` holds the accepted proposals,
    which come before it."""
    sampled_token_ids: dict[str, int] = field(default_factory=dict)
    logprobs: dict[str, PositionLogprobs] = field(default_factory=dict)
    sampled_logprob: dict[str, float] = field(default_factory=dict)
    prompt_logprobs: dict[str, list[PositionLogprobs]] = field(default_factory=dict)
    verified: dict[str, VerifiedDrafts] = field(default_factory=dict)


class Scheduler:
    def __init__(self, scheduler_config: SchedulerConfig, cache_config: CacheConfig,
                 num_blocks: int, max_model_len: int,
                 speculative_config: SpeculativeConfig | None = None) -> None:
        self.config = scheduler_config
        self.max_model_len = max_model_len
        self.kv = KVCacheManager(num_blocks, cache_config.block_size,
                                 cache_config.enable_prefix_caching)
        self.requests: dict[str, Request] = {}
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self._finished_ids: list[str] = []
        self.num_preemptions = 0
        self.speculation = (SpeculationPlanner(speculative_config, max_model_len)
                            if speculative_config is not None else None)
        self.spec_stats = SpecDecodingStats()

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
            spec = self._speculation(request, num_new, budget)
            spec = self._allocate_or_preempt(request, num_new, spec, out)
            if spec is None:   # the request itself was preempted
                continue
            num_new += spec.num_tokens
            out.scheduled.append(ScheduledRequest(request, num_new,
                                                  self.kv.block_ids(request.request_id),
                                                  spec.num_tokens, spec.token_ids))
            budget -= num_new
            index += 1
        return budget

    def _speculation(self, request: Request, num_new: int, budget: int) -> Speculation:
        """Tentative tokens for a decoding request (only its last token is uncomputed),
        as many as the budget leaves room for."""
        if (self.speculation is None or num_new != 1
                or request.num_computed_tokens != request.num_tokens - 1):
            return NO_SPECULATION
        return self.speculation.plan(request).truncated(budget - num_new)

    def _allocate_or_preempt(self, request: Request, num_new: int, spec: Speculation,
                             out: SchedulerOutput) -> Speculation | None:
        """Slots for the request's tokens and its speculation; when blocks run out, drop
        the speculation first (it is optional), then preempt from the back of the running
        list (never a request already scheduled in this step). None if the request itself
        was preempted."""
        while self.kv.allocate_slots(request, num_new + spec.num_tokens) is None:
            if spec.num_tokens:
                spec = NO_SPECULATION
                continue
            victim = self.running.pop()
            self._preempt(victim, out)
            if victim is request:
                return None
        return spec

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
            verified = result.verified.get(request.request_id) or VerifiedDrafts()
            num_rejected = item.num_spec_tokens - len(verified.accepted_token_ids)
            # The KV of rejected tokens is stale: they do not count as computed.
            request.num_computed_tokens += item.num_new_tokens - num_rejected
            if item.num_spec_tokens:
                self.spec_stats.observe(item.num_spec_tokens, len(verified.accepted_token_ids))
            token = result.sampled_token_ids.get(request.request_id)
            if token is None:
                continue
            new_tokens, status = self._append_tokens(request, verified, result)
            if status is not None:
                self.running.remove(request)
                self._finish(request, status)
            elif num_rejected:
                self.kv.free_blocks_beyond(request, request.num_tokens)
            updated.append((request, new_tokens))
        return updated

    def _append_tokens(self, request: Request, verified: VerifiedDrafts,
                       result: ModelRunnerOutput) -> tuple[list[int], RequestStatus | None]:
        """Append the accepted proposals, then the sampled token, checking stops after each
        one and dropping what follows the first stop. Returns the tokens appended and the
        stop status, if any."""
        rid = request.request_id
        tokens = verified.accepted_token_ids + [result.sampled_token_ids[rid]]
        logprobs = verified.logprobs + ([result.logprobs[rid]] if rid in result.logprobs else [])
        sampled = verified.sampled_logprobs + ([result.sampled_logprob[rid]]
                                               if rid in result.sampled_logprob else [])
        appended: list[int] = []
        for i, token in enumerate(tokens):
            request.append_output_token(token)
            appended.append(token)
            if i < len(sampled):
                request.cumulative_logprob += sampled[i]
            if request.logprobs is not None:
                request.logprobs.append(logprobs[i])
            status = self._check_stop(request, token)
            if status is not None:
                return appended, status
        return appended, None

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
