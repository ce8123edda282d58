"""One scheduled step as model inputs, and the step's logits turned back into outputs.

Shared by every model runner (torch on any device, OpenVINO): prefill chunks and
decodes of many requests are packed into one flat batch of tokens, and logits are
computed only at the rows that need them: the last token of each request that
samples, and the prompt positions of requests that ask for prompt logprobs.
A request that verifies k proposals (speculative decoding) needs k + 1 rows: its last
known token's and each proposal's.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from heron.core.request import PositionLogprobs
from heron.core.scheduler import ModelRunnerOutput, ScheduledRequest, SchedulerOutput
from heron.kernels.interface import AttentionMetadata
from heron.worker.sampler import Sampler, top_logprobs
from heron.worker.spec_decode.verify import SpecRows, verify_all


@dataclass
class PromptLogprobRows:
    """Rows of the flat batch whose logits score prompt tokens of one request."""
    request_id: str
    rows: range
    targets: list[int]     # the prompt token each row predicts
    k: int                 # how many top logprobs to return per position


@dataclass
class StepInputs:
    input_ids: torch.Tensor
    positions: torch.Tensor
    meta: AttentionMetadata
    # Row in the flat batch of each request's last token, for requests that sample.
    sample_rows: list[int]
    sample_items: list[ScheduledRequest]
    prompt_rows: list[PromptLogprobRows] = field(default_factory=list)
    # Requests verifying proposals, and their k + 1 rows each (after the samples' rows).
    spec_rows: list[SpecRows] = field(default_factory=list)
    spec_logits_rows: list[int] = field(default_factory=list)

    def logits_rows(self) -> list[int]:
        """Every row whose logits the step needs: prompt-logprob rows first, then samples,
        then the rows of requests that verify proposals."""
        rows = [r for p in self.prompt_rows for r in p.rows]
        return rows + self.sample_rows + self.spec_logits_rows


def prepare_inputs(sched: SchedulerOutput, block_size: int, device: torch.device,
                   drafts: dict[str, list[int]] | None = None) -> StepInputs:
    """The flat batch of one scheduled step. `drafts` are the proposals of requests whose
    tentative tokens the worker's draft model proposed (by request id)."""
    token_chunks, starts, sample_rows, sample_items, prompt_rows = [], [], [], [], []
    spec_rows, spec_logits_rows = [], []
    row = 0
    for item in sched.scheduled:
        start, n = item.start, item.num_new_tokens
        proposed = (drafts or {}).get(item.request.request_id)
        chunk = item.input_token_ids(proposed)
        token_chunks.append(chunk)
        starts.append(start)
        prompt = _prompt_logprob_rows(item, row)
        if prompt is not None:
            prompt_rows.append(prompt)
        row += n
        if item.num_spec_tokens:
            k = item.num_spec_tokens
            spec_rows.append(SpecRows(item, chunk[n - k:]))
            spec_logits_rows.extend(range(row - k - 1, row))
        elif item.completes_sequence:
            sample_rows.append(row - 1)
            sample_items.append(item)
    query_lens = [item.num_new_tokens for item in sched.scheduled]
    meta = build_metadata([item.block_ids for item in sched.scheduled], starts, query_lens,
                          block_size, device)
    input_ids = torch.from_numpy(np.array([t for chunk in token_chunks for t in chunk],
                                          dtype=np.int64))
    return StepInputs(input_ids.to(device), meta.positions, meta, sample_rows, sample_items,
                      prompt_rows, spec_rows, spec_logits_rows)


def _prompt_logprob_rows(item: ScheduledRequest, first_row: int) -> PromptLogprobRows | None:
    """Log-probabilities of prompt tokens 1.. come from the hidden states before them."""
    request, start, n = item.request, item.start, item.num_new_tokens
    k = request.sampling_params.prompt_logprobs
    last = min(start + n, request.num_prompt_tokens - 1)  # last predicted prompt position
    if k is None or last <= start:
        return None
    count = last - start
    return PromptLogprobRows(request.request_id, range(first_row, first_row + count),
                             request.prompt_token_ids[start + 1:last + 1], k)


def build_metadata(block_ids: list[list[int]], starts: list[int], query_lens: list[int],
                   block_size: int, device: torch.device) -> AttentionMetadata:
    """Attention metadata for sequences whose first new token is at `starts[i]`."""
    if max(query_lens) == 1:
        return _decode_metadata(block_ids, starts, block_size, device)
    num_seqs = len(block_ids)
    seq_lens = [s + n for s, n in zip(starts, query_lens)]
    width = max(len(b) for b in block_ids)
    table = np.zeros((num_seqs, width), dtype=np.int32)
    for i, ids in enumerate(block_ids):
        table[i, :len(ids)] = ids
    query_start = np.zeros(num_seqs + 1, dtype=np.int32)
    np.cumsum(query_lens, out=query_start[1:])
    seq_index = np.repeat(np.arange(num_seqs), query_lens)
    positions = np.concatenate([np.arange(s, s + n) for s, n in zip(starts, query_lens)])
    bs = block_size
    slots = table[seq_index, positions // bs].astype(np.int64) * bs + positions % bs
    return AttentionMetadata(
        num_seqs=num_seqs, num_tokens=int(query_start[-1]),
        query_start_loc=torch.from_numpy(query_start).to(device),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=device),
        block_tables=torch.from_numpy(table).to(device),
        slot_mapping=torch.from_numpy(slots).to(device),
        max_query_len=max(query_lens), max_seq_len=max(seq_lens), block_size=bs,
        query_start_loc_cpu=query_start.tolist(), seq_lens_cpu=seq_lens,
        positions=torch.from_numpy(positions).to(device))


def _decode_metadata(block_ids: list[list[int]], starts: list[int], block_size: int,
                     device: torch.device) -> AttentionMetadata:
    """build_metadata when every sequence has one new token (a decode step): the same
    tensors from plain lists, which at a few sequences costs a fraction of numpy's calls."""
    num_seqs, bs = len(block_ids), block_size
    seq_lens = [s + 1 for s in starts]
    width = max(len(b) for b in block_ids)
    table = [ids + [0] * (width - len(ids)) for ids in block_ids]
    slots = [ids[s // bs] * bs + s % bs for ids, s in zip(block_ids, starts)]
    query_start = list(range(num_seqs + 1))

    def as_tensor(values: list, dtype: type) -> torch.Tensor:
        # np.array + from_numpy: a third of torch.tensor's cost on a short list
        return torch.from_numpy(np.array(values, dtype=dtype)).to(device)

    return AttentionMetadata(
        num_seqs=num_seqs, num_tokens=num_seqs,
        query_start_loc=as_tensor(query_start, np.int32), seq_lens=as_tensor(seq_lens, np.int32),
        block_tables=as_tensor(table, np.int32), slot_mapping=as_tensor(slots, np.int64),
        max_query_len=1, max_seq_len=max(seq_lens), block_size=bs,
        query_start_loc_cpu=query_start, seq_lens_cpu=seq_lens,
        positions=as_tensor(starts, np.int64))


def profile_metadata(num_tokens: int, max_len: int, block_size: int,
                     device: torch.device) -> tuple[AttentionMetadata, int]:
    """Metadata of a dummy prefill of `num_tokens` tokens, in sequences of at most `max_len`,
    over blocks 0..n-1 of a throw-away cache; and n, the blocks it needs."""
    num_tokens = max(1, num_tokens)
    lens = [min(max_len, num_tokens - s) for s in range(0, num_tokens, max_len)]
    blocks_per_seq = [-(-n // block_size) for n in lens]
    first_block = np.cumsum([0] + blocks_per_seq[:-1])
    block_ids = [list(range(b, b + n)) for b, n in zip(first_block, blocks_per_seq)]
    meta = build_metadata(block_ids, [0] * len(lens), lens, block_size, device)
    return meta, sum(blocks_per_seq)


def outputs_from_logits(inputs: StepInputs, logits: torch.Tensor, sampler: Sampler,
                        draft_probs: dict[str, torch.Tensor] | None = None) -> ModelRunnerOutput:
    """Prompt logprobs, sampled tokens and verified proposals from float32 logits at
    `inputs.logits_rows()`. `draft_probs` are the draft model's distributions for its
    proposals ([k, vocab] by request id; proposals without them have a one-hot q)."""
    result = ModelRunnerOutput()
    at = 0
    for prompt in inputs.prompt_rows:
        count = len(prompt.rows)
        logprobs = torch.log_softmax(logits[at:at + count], -1)
        positions: list[PositionLogprobs] = [top_logprobs(logprobs[j], prompt.targets[j],
                                                          prompt.k)[0] for j in range(count)]
        result.prompt_logprobs[prompt.request_id] = positions
        at += count
    if inputs.sample_items:
        requests = [item.request for item in inputs.sample_items]
        sampled = sampler(logits[at:at + len(requests)], requests)
        for i, request in enumerate(requests):
            rid = request.request_id
            result.sampled_token_ids[rid] = sampled.token_ids[i]
            if sampled.logprobs[i] is not None:
                result.logprobs[rid] = sampled.logprobs[i]
                result.sampled_logprob[rid] = sampled.sampled_logprob[i]
        at += len(requests)
    if inputs.spec_rows:
        for rid, verified in verify_all(logits[at:], inputs.spec_rows, sampler,
                                        draft_probs).items():
            result.sampled_token_ids[rid] = verified.token_id
            result.verified[rid] = verified.drafts
            if verified.logprobs is not None:
                result.logprobs[rid] = verified.logprobs
                result.sampled_logprob[rid] = verified.sampled_logprob
    return result
