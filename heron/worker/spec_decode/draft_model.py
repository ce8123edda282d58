"""A draft model that proposes tokens for the target model to verify.

The draft is a smaller model of the same tokenizer. Its KV cache has as many blocks as
the target's and uses the target's block ids, so the scheduler's block tables serve
both and freeing a request's blocks frees both caches at once.

At the start of each step, before the target's forward pass, the draft catches up:
one forward pass over every scheduled request's known tokens it has not computed yet
(prompt chunks, accepted proposals and the last sampled token), with logits at the
last known token of each request that proposes. It then runs one single-token pass per
further proposal. Its KV past a request's known tokens is never trusted afterwards:
the next catch-up recomputes whatever the target accepted.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from heron.config import EngineConfig
from heron.core.scheduler import ScheduledRequest, SchedulerOutput
from heron.logger import get_logger
from heron.models.loader import load_model
from heron.platforms.interface import Platform
from heron.worker.forward import choose_compiled_forward, forward_pass
from heron.worker.sampler import Sampler, sampling_probs
from heron.worker.spec_decode.rejection_sampler import sample_from
from heron.worker.step_inputs import build_metadata

logger = get_logger(__name__)


def make_drafter(config: EngineConfig, platform: Platform, device: torch.device,
                 target_vocab_size: int) -> "DraftModelProposer | None":
    """The draft model of `config.speculative`, or None when it names none."""
    spec = config.speculative
    if spec is None or spec.method != "draft_model":
        return None
    return DraftModelProposer(config, platform, device, target_vocab_size)


@dataclass
class Proposal:
    """One request's proposed tokens; `probs` ([k, vocab]) is the draft distribution each
    was drawn from (None for greedy requests, whose proposals are the draft's argmax)."""
    token_ids: list[int]
    probs: torch.Tensor | None


@dataclass
class _Chunk:
    """Tokens the draft computes for one request in the catch-up pass."""
    item: ScheduledRequest
    start: int
    token_ids: list[int]
    num_proposals: int


class DraftModelProposer:
    def __init__(self, config: EngineConfig, platform: Platform, device: torch.device,
                 target_vocab_size: int) -> None:
        spec = config.speculative
        assert spec is not None and spec.model
        loaded = load_model(spec.model, config.model.dtype, device)
        self.model = platform.prepare_model(loaded.model, loaded.dtype)
        self.dtype = loaded.dtype
        self.device = device
        self.block_size = config.cache.block_size
        self.target_vocab_size = target_vocab_size
        cfg = loaded.hf_config
        self.num_layers = cfg.num_hidden_layers
        num_heads = cfg.num_attention_heads
        self.num_kv_heads = getattr(cfg, "num_key_value_heads", None) or num_heads
        self.head_size = getattr(cfg, "head_dim", None) or cfg.hidden_size // num_heads
        backend_cls = platform.attention_backend(self.dtype, self.head_size)
        self.backend = backend_cls(num_heads, self.num_kv_heads, self.head_size,
                                   self.head_size ** -0.5)
        self.layer_ops = platform.layer_ops(self.dtype)
        # The platform's compiled forward, as for the target: the draft's k single-token
        # passes per step are where it pays most.
        self.compiled = choose_compiled_forward(platform, self.model, self.backend, self.dtype,
                                                config.model.enforce_eager)
        self.kv_caches: list[torch.Tensor] = []
        # Positions of each request whose draft KV is valid (the known tokens computed).
        self._num_computed: dict[str, int] = {}
        if cfg.vocab_size != target_vocab_size:
            logger.info("draft vocabulary %d, target %d: proposals are limited to the target's",
                        cfg.vocab_size, target_vocab_size)
        logger.info("draft model %s loaded: %s, %d layers", spec.model, self.dtype,
                    self.num_layers)

    # -- memory -------------------------------------------------------------------------

    def weights_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.model.parameters())

    def _cache_shape(self, num_blocks: int) -> tuple[int, ...]:
        return self.backend.kv_cache_shape(num_blocks, self.block_size, self.num_kv_heads,
                                           self.head_size)

    def kv_block_bytes(self) -> int:
        per_layer = int(np.prod(self._cache_shape(1))) * torch.finfo(self.dtype).bits // 8
        return per_layer * self.num_layers

    def initialize_cache(self, num_blocks: int) -> None:
        self.kv_caches = [torch.empty(self._cache_shape(num_blocks), dtype=self.dtype,
                                      device=self.device) for _ in range(self.num_layers)]

    # -- proposing ----------------------------------------------------------------------

    @torch.inference_mode()
    def propose(self, sched: SchedulerOutput, sampler: Sampler) -> dict[str, Proposal]:
        """Catch up on every scheduled request's known tokens, then propose
        `num_spec_tokens` tokens for each request that has them."""
        for request_id in [*sched.finished_ids, *sched.preempted_ids]:
            self._num_computed.pop(request_id, None)
        chunks = [c for c in (self._chunk(item) for item in sched.scheduled) if c is not None]
        if not chunks:
            return {}
        proposing = [c for c in chunks if c.num_proposals]
        logits = self._catch_up(chunks, proposing)
        for chunk in chunks:
            self._num_computed[chunk.item.request.request_id] = chunk.start + len(chunk.token_ids)
        if not proposing:
            return {}
        return self._draft(proposing, logits, sampler)

    def _chunk(self, item: ScheduledRequest) -> _Chunk | None:
        request = item.request
        known_end = item.start + item.num_new_tokens - item.num_spec_tokens
        start = self._num_computed.get(request.request_id, item.start)
        # Past the target's start: a preempted request recomputing into new blocks (or a
        # prefix-cache hit, whose blocks hold the draft's KV as well as the target's).
        if start > item.start:
            start = item.start
        if item.num_spec_tokens:
            start = min(start, known_end - 1)   # logits at the last known token are needed
        if start >= known_end:
            return None
        return _Chunk(item, start, request.all_token_ids[start:known_end], item.num_spec_tokens)

    def _forward(self, block_ids: list[list[int]], starts: list[int], token_ids: list[list[int]],
                 logits_rows: list[int]) -> torch.Tensor:
        meta = build_metadata(block_ids, starts, [len(t) for t in token_ids], self.block_size,
                              self.device)
        ids = torch.from_numpy(np.array([t for chunk in token_ids for t in chunk],
                                        dtype=np.int64)).to(self.device)
        hidden = forward_pass(self.compiled, self.model, ids, meta, self.kv_caches, self.backend,
                              self.layer_ops)
        if not logits_rows:
            return torch.empty(0)
        rows = torch.from_numpy(np.array(logits_rows, dtype=np.int64)).to(self.device)
        logits = self.model.compute_logits(hidden[rows])
        return self._to_target_vocab(logits.float())

    def _to_target_vocab(self, logits: torch.Tensor) -> torch.Tensor:
        """Draft logits over the target's vocabulary (tokens the target lacks are never
        proposed; tokens the draft lacks get probability 0)."""
        width = self.target_vocab_size
        if logits.shape[-1] >= width:
            return logits[:, :width]
        pad = logits.new_full((logits.shape[0], width - logits.shape[-1]), float("-inf"))
        return torch.cat([logits, pad], dim=-1)

    def _catch_up(self, chunks: list[_Chunk], proposing: list[_Chunk]) -> torch.Tensor:
        rows, at, wanted = [], 0, {id(c) for c in proposing}
        for chunk in chunks:
            at += len(chunk.token_ids)
            if id(chunk) in wanted:
                rows.append(at - 1)
        return self._forward([c.item.block_ids for c in chunks], [c.start for c in chunks],
                             [c.token_ids for c in chunks], rows)

    def _draft(self, proposing: list[_Chunk], logits: torch.Tensor,
               sampler: Sampler) -> dict[str, Proposal]:
        """Sample proposal 1 from the catch-up logits, then one pass per further proposal."""
        tokens: list[list[int]] = [[] for _ in proposing]
        probs: list[list[torch.Tensor]] = [[] for _ in proposing]
        active = list(range(len(proposing)))
        while True:
            for row, i in enumerate(active):
                token, q = self._sample(logits[row], proposing[i].item, sampler)
                tokens[i].append(token)
                if q is not None:
                    probs[i].append(q)
            active = [i for i in active if len(tokens[i]) < proposing[i].num_proposals]
            if not active:
                break
            chunks = [proposing[i] for i in active]
            # The last proposal goes in at the position after the known tokens and the
            # proposals before it.
            positions = [c.start + len(c.token_ids) + len(tokens[i]) - 1
                         for c, i in zip(chunks, active)]
            logits = self._forward([c.item.block_ids for c in chunks], positions,
                                   [[tokens[i][-1]] for i in active], list(range(len(active))))
        return {c.item.request.request_id: Proposal(tokens[i], torch.stack(probs[i])
                                                    if probs[i] else None)
                for i, c in enumerate(proposing)}

    @staticmethod
    def _sample(logits: torch.Tensor, item: ScheduledRequest,
                sampler: Sampler) -> tuple[int, torch.Tensor | None]:
        params = item.request.sampling_params
        if params.greedy:
            return int(logits.argmax()), None
        q = sampling_probs(logits.unsqueeze(0), [params])[0]
        return sample_from(q, sampler.generator_for(item.request)), q
