"""The model runner: one scheduled step -> one forward pass -> sampled tokens.

Prefill chunks and decodes of many requests are packed into one flat batch of
tokens; logits are computed only where a token is sampled (and, for requests that
ask for prompt logprobs, at their prompt positions).
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch

from heron.config import EngineConfig
from heron.core.request import PositionLogprobs
from heron.core.scheduler import ModelRunnerOutput, ScheduledRequest, SchedulerOutput
from heron.forward_context import ForwardContext, set_forward_context
from heron.kernels.interface import AttentionMetadata
from heron.logger import get_logger
from heron.models.loader import load_model
from heron.platforms.interface import Platform
from heron.worker.sampler import Sampler, top_logprobs

logger = get_logger(__name__)


@dataclass
class StepInputs:
    input_ids: torch.Tensor
    positions: torch.Tensor
    meta: AttentionMetadata
    # Row in the flat batch of each request's last token, for requests that sample.
    sample_rows: list[int]
    sample_items: list[ScheduledRequest]


class ModelRunner:
    def __init__(self, config: EngineConfig, platform: Platform, model_path: str) -> None:
        self.config = config
        self.device = platform.torch_device()
        self.block_size = config.cache.block_size
        loaded = load_model(model_path, config.model.dtype, self.device)
        self.model = platform.prepare_model(loaded.model, loaded.dtype)
        self.hf_config = loaded.hf_config
        self.dtype = loaded.dtype
        self.model_max_len = loaded.max_model_len
        cfg = self.hf_config
        self.num_layers = cfg.num_hidden_layers
        self.num_heads = cfg.num_attention_heads
        self.num_kv_heads = getattr(cfg, "num_key_value_heads", None) or self.num_heads
        self.head_size = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.num_heads
        self.vocab_size = cfg.vocab_size
        backend_cls = platform.attention_backend(self.dtype, self.head_size)
        self.backend = backend_cls(self.num_heads, self.num_kv_heads, self.head_size,
                                   self.head_size ** -0.5)
        self.layer_ops = platform.layer_ops(self.dtype)
        self.sampler = Sampler(self.device, config.model.seed)
        self.kv_caches: list[torch.Tensor] = []
        logger.info("model %s loaded: %s, %d layers, attention backend %s",
                    model_path, self.dtype, self.num_layers, self.backend.name)

    # -- memory -------------------------------------------------------------------------

    def weights_bytes(self) -> int:
        tensors = list(self.model.parameters()) + [
            t for m in self.model.modules() for t in vars(m).values() if isinstance(t, torch.Tensor)]
        return sum(t.numel() * t.element_size() for t in tensors)

    def kv_cache_shape(self, num_blocks: int) -> tuple[int, ...]:
        return self.backend.kv_cache_shape(num_blocks, self.block_size, self.num_kv_heads,
                                           self.head_size)

    def kv_block_bytes(self) -> int:
        """Bytes one block takes across all layers."""
        per_layer = int(np.prod(self.kv_cache_shape(1))) * torch.finfo(self.dtype).bits // 8
        return per_layer * self.num_layers

    def initialize_cache(self, num_blocks: int) -> None:
        shape = self.kv_cache_shape(num_blocks)
        # Uninitialised on purpose: blocks are recycled without clearing anyway, so no
        # backend may read a slot this sequence has not written; and untouched pages of a
        # large cache cost neither time nor resident memory.
        self.kv_caches = [torch.empty(shape, dtype=self.dtype, device=self.device)
                          for _ in range(self.num_layers)]

    @torch.inference_mode()
    def profile_run(self, num_tokens: int) -> float:
        """A dummy forward pass over `num_tokens` tokens with a throw-away cache.

        Warms up kernels and lets the platform read peak memory; returns seconds. The
        tokens are split into sequences no longer than the model's context."""
        num_tokens = max(1, num_tokens)
        lens = [min(self.model_max_len, num_tokens - s)
                for s in range(0, num_tokens, self.model_max_len)]
        blocks_per_seq = [-(-n // self.block_size) for n in lens]
        caches = [torch.zeros(self.kv_cache_shape(sum(blocks_per_seq)), dtype=self.dtype,
                              device=self.device) for _ in range(self.num_layers)]
        first_block = np.cumsum([0] + blocks_per_seq[:-1])
        block_ids = [list(range(b, b + n)) for b, n in zip(first_block, blocks_per_seq)]
        meta = self._metadata(block_ids, [0] * len(lens), lens)
        ids = torch.zeros(num_tokens, dtype=torch.long, device=self.device)
        start = time.perf_counter()
        with set_forward_context(ForwardContext(meta, caches, self.backend, self.layer_ops)):
            hidden = self.model(ids, meta.positions)
        self.model.compute_logits(hidden[-1:])
        return time.perf_counter() - start

    # -- one step -----------------------------------------------------------------------

    @torch.inference_mode()
    def execute_model(self, sched: SchedulerOutput) -> ModelRunnerOutput:
        result = ModelRunnerOutput()
        if sched.is_empty:
            return result
        inputs = self._prepare_inputs(sched)
        with set_forward_context(ForwardContext(inputs.meta, self.kv_caches, self.backend,
                                                   self.layer_ops)):
            hidden = self.model(inputs.input_ids, inputs.positions)
        self._prompt_logprobs(sched, hidden, result)
        if inputs.sample_rows:
            rows = torch.tensor(inputs.sample_rows, device=self.device)
            logits = self.model.compute_logits(hidden[rows])
            requests = [item.request for item in inputs.sample_items]
            sampled = self.sampler(logits, requests)
            for i, request in enumerate(requests):
                rid = request.request_id
                result.sampled_token_ids[rid] = sampled.token_ids[i]
                if sampled.logprobs[i] is not None:
                    result.logprobs[rid] = sampled.logprobs[i]
                    result.sampled_logprob[rid] = sampled.sampled_logprob[i]
        return result

    def _prepare_inputs(self, sched: SchedulerOutput) -> StepInputs:
        token_chunks, starts, sample_rows, sample_items = [], [], [], []
        row = 0
        for item in sched.scheduled:
            start, n = item.start, item.num_new_tokens
            token_chunks.append(item.request.all_token_ids[start:start + n])
            starts.append(start)
            row += n
            if item.completes_sequence:
                sample_rows.append(row - 1)
                sample_items.append(item)
        query_lens = [item.num_new_tokens for item in sched.scheduled]
        meta = self._metadata([item.block_ids for item in sched.scheduled], starts, query_lens)
        input_ids = torch.tensor([t for chunk in token_chunks for t in chunk], dtype=torch.long)
        return StepInputs(input_ids.to(self.device), meta.positions, meta, sample_rows,
                          sample_items)

    def _metadata(self, block_ids: list[list[int]], starts: list[int],
                  query_lens: list[int]) -> AttentionMetadata:
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
        bs = self.block_size
        slots = table[seq_index, positions // bs].astype(np.int64) * bs + positions % bs
        dev = self.device
        return AttentionMetadata(
            num_seqs=num_seqs, num_tokens=int(query_start[-1]),
            query_start_loc=torch.from_numpy(query_start).to(dev),
            seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=dev),
            block_tables=torch.from_numpy(table).to(dev),
            slot_mapping=torch.from_numpy(slots).to(dev),
            max_query_len=max(query_lens), max_seq_len=max(seq_lens), block_size=bs,
            query_start_loc_cpu=query_start.tolist(), seq_lens_cpu=seq_lens,
            positions=torch.from_numpy(positions).to(dev))

    def _prompt_logprobs(self, sched: SchedulerOutput, hidden: torch.Tensor,
                         result: ModelRunnerOutput) -> None:
        """Log-probabilities of prompt tokens 1.. from the hidden states before them."""
        row = 0
        for item in sched.scheduled:
            request, start, n = item.request, item.start, item.num_new_tokens
            k = request.sampling_params.prompt_logprobs
            last = min(start + n, request.num_prompt_tokens - 1)  # last predicted prompt position
            if k is not None and last > start:
                count = last - start
                logprobs = torch.log_softmax(self.model.compute_logits(hidden[row:row + count]), -1)
                targets = request.prompt_token_ids[start + 1:last + 1]
                positions: list[PositionLogprobs] = [top_logprobs(logprobs[j], targets[j], k)[0]
                                                     for j in range(count)]
                result.prompt_logprobs[request.request_id] = positions
            row += n
