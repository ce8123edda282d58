"""Batched sampling: every SamplingParams field, applied to one [N, vocab] logits tensor.

Order: raw logprobs (what `logprobs=k` reports, before any processing), penalties,
min_tokens masking of stop tokens, then greedy argmax or temperature / top-k /
top-p / min-p sampling. Sampling draws exponential noise (the Gumbel-max trick in
its exponential form): a request with a seed draws from its own generator, so its
tokens do not depend on what else is in the batch.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from heron.core.request import Logprob, PositionLogprobs, Request


@dataclass
class SamplerOutput:
    token_ids: list[int]
    logprobs: list[PositionLogprobs | None]   # top-k plus the sampled token, if asked
    sampled_logprob: list[float | None]


class Sampler:
    def __init__(self, device: torch.device, seed: int) -> None:
        self.device = device
        self.generator = torch.Generator(device=device)
        self.generator.manual_seed(seed)

    def __call__(self, logits: torch.Tensor, requests: list[Request]) -> SamplerOutput:
        n = len(requests)
        params = [r.sampling_params for r in requests]
        want_logprobs = [p.logprobs is not None for p in params]
        raw_logprobs = torch.log_softmax(logits, dim=-1) if any(want_logprobs) else None
        logits = self.processed_logits(logits, requests)
        tokens = logits.argmax(dim=-1)
        random_rows = [i for i, p in enumerate(params) if not p.greedy]
        if random_rows:
            sampled = self._sample(logits[random_rows], [requests[i] for i in random_rows])
            tokens[random_rows] = sampled
        token_list = tokens.tolist()
        out_logprobs: list[PositionLogprobs | None] = [None] * n
        out_sampled: list[float | None] = [None] * n
        if raw_logprobs is not None:
            for i in range(n):
                if want_logprobs[i]:
                    out_logprobs[i], out_sampled[i] = top_logprobs(
                        raw_logprobs[i], token_list[i], params[i].logprobs)
        return SamplerOutput(token_list, out_logprobs, out_sampled)

    def processed_logits(self, logits: torch.Tensor, requests: list[Request]) -> torch.Tensor:
        """Logits after penalties and the min_tokens mask: greedy takes their argmax, and
        sampling applies temperature and the top-k/top-p/min-p filters to them."""
        if any(r.sampling_params.needs_penalties for r in requests):
            logits = apply_penalties(logits.clone(), requests)
        return self._mask_stop_tokens_before_min(logits, requests)

    def generator_for(self, request: Request) -> torch.Generator:
        """The request's own generator when it has a seed (created on first use), else the
        sampler's shared one."""
        if request.sampling_params.seed is None:
            return self.generator
        if request.generator is None:
            request.generator = torch.Generator(device=self.device)
            request.generator.manual_seed(request.sampling_params.seed)
        return request.generator

    @staticmethod
    def _mask_stop_tokens_before_min(logits: torch.Tensor, requests: list[Request]) -> torch.Tensor:
        rows, cols = [], []
        for i, r in enumerate(requests):
            if r.num_output_tokens < r.sampling_params.min_tokens:
                ids = [t for t in r.sampling_params.stop_ids() if t < logits.shape[-1]]
                rows += [i] * len(ids)
                cols += ids
        if rows:
            logits = logits.clone()
            logits[rows, cols] = float("-inf")
        return logits

    def _sample(self, logits: torch.Tensor, requests: list[Request]) -> torch.Tensor:
        probs = sampling_probs(logits, [r.sampling_params for r in requests])
        noise = torch.empty_like(probs)
        shared_rows = []
        for i, r in enumerate(requests):
            if r.sampling_params.seed is not None:
                if r.generator is None:
                    r.generator = torch.Generator(device=logits.device)
                    r.generator.manual_seed(r.sampling_params.seed)
                noise[i].exponential_(generator=r.generator)
            else:
                shared_rows.append(i)
        if shared_rows:
            noise[shared_rows] = torch.empty_like(probs[shared_rows]).exponential_(
                generator=self.generator)
        return (probs / noise).argmax(dim=-1)


def sampling_probs(logits: torch.Tensor, params: list) -> torch.Tensor:
    """The distribution random sampling draws from: temperature, then top-k/top-p/min-p."""
    temps = torch.tensor([p.temperature for p in params], device=logits.device)
    logits = logits / temps.unsqueeze(1)
    logits = apply_top_k_top_p_min_p(logits, params)
    return torch.softmax(logits, dim=-1)


def apply_penalties(logits: torch.Tensor, requests: list[Request]) -> torch.Tensor:
    """Repetition penalty over prompt and output tokens; presence/frequency over output."""
    vocab = logits.shape[-1]
    for i, r in enumerate(requests):
        p = r.sampling_params
        if not p.needs_penalties:
            continue
        row = logits[i]
        if p.repetition_penalty != 1.0:
            seen = torch.tensor(sorted(set(r.all_token_ids)), dtype=torch.long, device=row.device)
            seen = seen[seen < vocab]
            values = row[seen]
            row[seen] = torch.where(values > 0, values / p.repetition_penalty,
                                    values * p.repetition_penalty)
        if r.output_token_ids and (p.frequency_penalty or p.presence_penalty):
            out = torch.tensor(r.output_token_ids, dtype=torch.long, device=row.device)
            counts = torch.zeros(vocab, dtype=row.dtype, device=row.device)
            counts.scatter_add_(0, out, torch.ones_like(out, dtype=row.dtype))
            row -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).to(row.dtype)
    return logits


def apply_top_k_top_p_min_p(logits: torch.Tensor, params: list) -> torch.Tensor:
    """Mask (to -inf) tokens outside each row's top-k, top-p nucleus and min-p floor."""
    vocab = logits.shape[-1]
    top_k = [p.top_k if 0 < p.top_k < vocab else vocab for p in params]
    top_p = [p.top_p for p in params]
    min_p = [p.min_p for p in params]
    if all(k == vocab for k in top_k) and all(p >= 1.0 for p in top_p) and not any(min_p):
        return logits
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    ranks = torch.arange(vocab, device=logits.device).unsqueeze(0)
    remove = ranks >= torch.tensor(top_k, device=logits.device).unsqueeze(1)
    sorted_probs = torch.softmax(sorted_logits.masked_fill(remove, float("-inf")), dim=-1)
    # Keep a token if the probability mass before it is below top_p (so at least one).
    mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
    remove |= mass_before >= torch.tensor(top_p, device=logits.device).unsqueeze(1)
    floor = torch.tensor(min_p, device=logits.device).unsqueeze(1) * sorted_probs[:, :1]
    remove |= sorted_probs < floor
    remove[:, 0] = False
    mask = torch.zeros_like(remove).scatter_(1, order, remove)
    return logits.masked_fill(mask, float("-inf"))


def top_logprobs(row_logprobs: torch.Tensor, sampled: int, k: int) -> tuple[PositionLogprobs, float]:
    """The k most likely tokens of one position plus the sampled one, with ranks."""
    sampled_logprob = float(row_logprobs[sampled])
    result: PositionLogprobs = {}
    if k > 0:
        values, ids = row_logprobs.topk(k)
        for rank, (token, value) in enumerate(zip(ids.tolist(), values.tolist()), start=1):
            result[token] = Logprob(value, rank)
    if sampled not in result:
        rank = int((row_logprobs > sampled_logprob).sum()) + 1
        result[sampled] = Logprob(sampled_logprob, rank)
    return result, sampled_logprob
