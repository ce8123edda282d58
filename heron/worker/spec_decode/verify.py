"""Verify every request's proposals of a step against the target model's logits.

Each proposing request has k + 1 logits rows: the row of its last known token and one
per proposal. Row i is processed exactly as the sampler would process it had the
first i proposals already been generated: penalties see them in the history and
min_tokens counts them, so p at every row is the distribution normal sampling would
draw from at that position."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from heron.core.request import PositionLogprobs, Request
from heron.core.scheduler import ScheduledRequest, VerifiedDrafts
from heron.worker.sampler import Sampler, sampling_probs, top_logprobs
from heron.worker.spec_decode.rejection_sampler import (Verification, rejection_sample,
                                                        verify_greedy)


@dataclass
class SpecRows:
    """The logits rows of one request that verifies proposals (k + 1 of them, in order)."""
    item: ScheduledRequest
    proposals: list[int]


@dataclass
class _PositionView:
    """What the sampler reads of a request, at a position after some tentative tokens."""
    sampling_params: Any
    all_token_ids: list[int]
    output_token_ids: list[int]
    num_output_tokens: int


@dataclass
class VerifiedRequest:
    """One request's outcome: accepted proposals, the token after them, and logprobs."""
    drafts: VerifiedDrafts
    token_id: int
    logprobs: PositionLogprobs | None = None
    sampled_logprob: float | None = None


def _position_views(request: Request, proposals: list[int]) -> list[_PositionView]:
    params, views = request.sampling_params, []
    for i in range(len(proposals) + 1):
        if params.needs_penalties:   # only penalties read the history: copy it only then
            tentative = proposals[:i]
            history, outputs = request.all_token_ids + tentative, request.output_token_ids + tentative
        else:
            history, outputs = request.all_token_ids, request.output_token_ids
        views.append(_PositionView(params, history, outputs, request.num_output_tokens + i))
    return views


def verify_all(logits: torch.Tensor, spec_rows: list[SpecRows], sampler: Sampler,
               draft_probs: dict[str, torch.Tensor] | None = None) -> dict[str, VerifiedRequest]:
    """Verify each request's proposals; `logits` holds their rows back to back."""
    views = [v for s in spec_rows for v in _position_views(s.item.request, s.proposals)]
    processed = sampler.processed_logits(logits, views)   # type: ignore[arg-type]
    argmax = processed.argmax(dim=-1).tolist()
    results, at = {}, 0
    for spec in spec_rows:
        request, count = spec.item.request, len(spec.proposals) + 1
        rows = slice(at, at + count)
        params = request.sampling_params
        if params.greedy:
            outcome = verify_greedy(argmax[rows], spec.proposals)
        else:
            probs = sampling_probs(processed[rows], [params] * count)
            q = (draft_probs or {}).get(request.request_id)
            outcome = rejection_sample(probs, spec.proposals, q, sampler.generator_for(request))
        results[request.request_id] = _with_logprobs(logits[rows], spec.proposals, outcome,
                                                     params.logprobs)
        at += count
    return results


def _with_logprobs(raw_logits: torch.Tensor, proposals: list[int], outcome: Verification,
                   num_logprobs: int | None) -> VerifiedRequest:
    """Package the outcome, with each emitted token's logprobs (before any processing, as
    the sampler reports them) when the request asks for them."""
    accepted = proposals[:outcome.num_accepted]
    drafts = VerifiedDrafts(list(accepted))
    result = VerifiedRequest(drafts, outcome.token_id)
    if num_logprobs is None:
        return result
    logprobs = torch.log_softmax(raw_logits[:outcome.num_accepted + 1].float(), dim=-1)
    for i, token in enumerate(accepted + [outcome.token_id]):
        position, value = top_logprobs(logprobs[i], token, num_logprobs)
        if i < len(accepted):
            drafts.logprobs.append(position)
            drafts.sampled_logprobs.append(value)
        else:
            result.logprobs, result.sampled_logprob = position, value
    return result
