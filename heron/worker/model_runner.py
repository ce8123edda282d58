"""The model runner: one scheduled step -> one forward pass -> sampled tokens.

Prefill chunks and decodes of many requests are packed into one flat batch of
tokens; logits are computed only where a token is sampled (and, for requests that
ask for prompt logprobs, at their prompt positions). Under tensor parallelism every
rank runs the same step on its shard; rank 0 gathers the logits and samples.
"""
from __future__ import annotations

import time

import numpy as np
import torch

from heron.config import EngineConfig
from heron.core.scheduler import ModelRunnerOutput, SchedulerOutput
from heron.distributed import TensorParallelGroup
from heron.kernels.interface import AttentionMetadata, kv_cache_torch_dtype
from heron.logger import get_logger
from heron.models.loader import LoadedModel, load_model
from heron.quantization import dequantize_linears
from heron.platforms.interface import Platform
from heron.worker.forward import choose_compiled_forward, forward_pass
from heron.worker.sampler import Sampler
from heron.worker.spec_decode.draft_model import make_drafter
from heron.worker.step_inputs import outputs_from_logits, prepare_inputs, profile_metadata

logger = get_logger(__name__)


def load_model_for(platform: Platform, config: EngineConfig, model_path: str,
                   device: torch.device, group: TensorParallelGroup) -> LoadedModel:
    """The model, its GGUF weights kept in the formats the platform's kernels run, and
    with `quantization="int8"/"int4"` its linear layers quantized."""
    from heron.quantization.weight_only import quantize_model
    loaded = load_model(model_path, config.model.dtype, device, group,
                        keep_quantized=platform.capabilities.quantization)
    if config.model.quantization in ("int8", "int4"):
        quantize_model(loaded.model, config.model.quantization, loaded.dtype)
    return loaded


class ModelRunner:
    """heron's torch model runner: what a `Worker` drives on each rank (see
    docs/writing-a-platform-plugin.md for the methods a platform's own runner provides)."""

    def __init__(self, config: EngineConfig, platform: Platform, model_path: str,
                 group: TensorParallelGroup | None = None) -> None:
        self.config = config
        self.group = group or TensorParallelGroup.single()
        self.device = platform.torch_device()
        self.block_size = config.cache.block_size
        loaded = load_model_for(platform, config, model_path, self.device, self.group)
        self.model = platform.prepare_model(loaded.model, loaded.dtype)
        dequantize_linears(self.model, (), f"{platform.name} in {loaded.dtype}")
        self.hf_config = loaded.hf_config
        self.dtype = loaded.dtype
        self.model_max_len = loaded.max_model_len
        cfg = loaded.shard_config   # this rank's heads: they size its shard of the KV cache
        self.num_layers = cfg.num_hidden_layers
        self.num_heads = cfg.num_attention_heads
        self.num_kv_heads = getattr(cfg, "num_key_value_heads", None) or self.num_heads
        self.head_size = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.num_heads
        self.vocab_size = self.hf_config.vocab_size
        # The model's dtype, or an fp8 one (kv_cache_dtype="fp8"): one byte per value.
        self.kv_cache_dtype = kv_cache_torch_dtype(config.cache.kv_cache_dtype, self.dtype)
        backend_cls = platform.attention_backend(self.dtype, self.head_size)
        self.backend = backend_cls(self.num_heads, self.num_kv_heads, self.head_size,
                                   self.head_size ** -0.5)
        self.layer_ops = platform.layer_ops(self.dtype)
        # The platform's compiled forward pass, when it offers one for this model on one rank.
        self.compiled = None if self.group.world_size > 1 else choose_compiled_forward(
            platform, self.model, self.backend, self.dtype, config.model.enforce_eager)
        self.sampler = Sampler(self.device, config.model.seed)
        self.kv_caches: list[torch.Tensor] = []
        self.drafter = make_drafter(config, platform, self.device, self.vocab_size)
        logger.info("model %s loaded: %s, %d layers, attention backend %s, KV cache %s",
                    model_path, self.dtype, self.num_layers, self.backend.name,
                    str(self.kv_cache_dtype).removeprefix("torch."))

    # -- memory -------------------------------------------------------------------------

    def weights_bytes(self) -> int:
        tensors = list(self.model.parameters()) + list(self.model.buffers()) + [
            t for m in self.model.modules() for t in vars(m).values() if isinstance(t, torch.Tensor)]
        drafter = self.drafter.weights_bytes() if self.drafter else 0
        return sum(t.numel() * t.element_size() for t in tensors) + drafter

    def kv_cache_shape(self, num_blocks: int) -> tuple[int, ...]:
        return self.backend.kv_cache_shape(num_blocks, self.block_size, self.num_kv_heads,
                                           self.head_size)

    def kv_block_bytes(self) -> int:
        """Bytes one block takes across all layers (and the draft model's, whose cache has
        as many blocks, so that the KV budget holds both)."""
        per_layer = (int(np.prod(self.kv_cache_shape(1)))
                     * torch.finfo(self.kv_cache_dtype).bits // 8)
        drafter = self.drafter.kv_block_bytes() if self.drafter else 0
        return per_layer * self.num_layers + drafter

    def initialize_cache(self, num_blocks: int) -> None:
        shape = self.kv_cache_shape(num_blocks)
        # Uninitialised on purpose: blocks are recycled without clearing anyway, so no
        # backend may read a slot this sequence has not written; and untouched pages of a
        # large cache cost neither time nor resident memory.
        self.kv_caches = [torch.empty(shape, dtype=self.kv_cache_dtype, device=self.device)
                          for _ in range(self.num_layers)]
        if self.drafter:
            self.drafter.initialize_cache(num_blocks)

    @torch.inference_mode()
    def profile_run(self, num_tokens: int) -> float:
        """A dummy forward pass over `num_tokens` tokens with a throw-away cache.

        Warms up kernels and lets the platform read peak memory; returns seconds. The
        tokens are split into sequences no longer than the model's context."""
        meta, num_blocks = profile_metadata(num_tokens, self.model_max_len, self.block_size,
                                            self.device)
        caches = [torch.zeros(self.kv_cache_shape(num_blocks), dtype=self.kv_cache_dtype,
                              device=self.device) for _ in range(self.num_layers)]
        ids = torch.zeros(meta.num_tokens, dtype=torch.long, device=self.device)
        start = time.perf_counter()
        hidden = self._forward(ids, meta, caches)
        self._gather_logits(self.model.compute_logits(hidden[-1:]))
        return time.perf_counter() - start

    # -- one step -----------------------------------------------------------------------

    @torch.inference_mode()
    def execute_model(self, sched: SchedulerOutput) -> ModelRunnerOutput:
        if sched.is_empty:
            return ModelRunnerOutput()
        # A draft model proposes the tentative tokens the scheduler left to it.
        proposals = self.drafter.propose(sched, self.sampler) if self.drafter else {}
        inputs = prepare_inputs(sched, self.block_size, self.device,
                                {rid: p.token_ids for rid, p in proposals.items()})
        hidden = self._forward(inputs.input_ids, inputs.meta, self.kv_caches)
        rows = inputs.logits_rows()
        if not rows:
            return ModelRunnerOutput()
        if rows != list(range(hidden.shape[0])):   # a decode step samples every row, in order
            hidden = hidden[torch.from_numpy(np.array(rows, dtype=np.int64)).to(self.device)]
        logits = self._gather_logits(self.model.compute_logits(hidden))
        if logits is None:   # a rank other than 0: its shard of the logits went to rank 0
            return ModelRunnerOutput()
        return outputs_from_logits(inputs, logits, self.sampler,
                                   {rid: p.probs for rid, p in proposals.items()
                                    if p.probs is not None})

    def _forward(self, input_ids: torch.Tensor, meta: AttentionMetadata,
                 kv_caches: list[torch.Tensor]) -> torch.Tensor:
        """Final hidden states of the step: the platform's compiled forward when there is
        one, else the model's layers called from Python."""
        return forward_pass(self.compiled, self.model, input_ids, meta, kv_caches, self.backend,
                            self.layer_ops)

    def _gather_logits(self, logits: torch.Tensor) -> torch.Tensor | None:
        """The whole vocabulary's logits on rank 0 (None elsewhere); the identity on one rank."""
        if self.group.world_size == 1:
            return logits
        gathered = self.group.gather_to_first(logits)
        return None if gathered is None else gathered[:, :self.vocab_size]
