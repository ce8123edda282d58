"""The model runner of the openvino platform: heron's scheduler and KV-cache manager decide,
OpenVINO computes.

Each step is one inference of the compiled model. heron's block tables become the
PagedAttention inputs (`past_lens`, `subsequence_begins`, `block_indices`,
`block_indices_begins`); the key and value caches are OpenVINO tensors heron
allocates once, sized in blocks of the shape the device chose at compile time,
and bound to the infer request, so the device writes new keys and values into
heron's blocks in place. Sampling, logprobs and stop handling are heron's own.
"""
from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch

from heron.config import EngineConfig
from heron.core.scheduler import ModelRunnerOutput, SchedulerOutput
from heron.logger import get_logger
from heron.models.loader import describe_model
from heron.platforms.openvino.convert import ConvertedModel, convert, key_cache_name, value_cache_name
from heron.platforms.openvino.options import OpenVinoOptions
from heron.worker.sampler import Sampler
from heron.worker.step_inputs import (StepInputs, outputs_from_logits, prepare_inputs,
                                     profile_metadata)

logger = get_logger(__name__)


class OpenVinoModelRunner:
    """Same surface as the torch `ModelRunner` (what `UniProcExecutor` calls)."""

    def __init__(self, config: EngineConfig, options: OpenVinoOptions, model_path: str) -> None:
        import openvino as ov

        self.config = config
        self.options = options
        self.block_size = config.cache.block_size
        description = describe_model(model_path, config.model.dtype)
        self.hf_config = description.hf_config
        self.dtype = description.dtype
        self.model_max_len = description.max_model_len
        self.vocab_size = self.hf_config.vocab_size
        start = time.perf_counter()
        core = ov.Core()
        self.converted: ConvertedModel = convert(description, options.cache_path("ir"), core)
        self.num_layers = self.converted.num_layers
        capabilities = core.get_property(options.device, "OPTIMIZATION_CAPABILITIES")
        self.compiled = _compile(core, self.converted.model, options.device,
                                 options.compile_properties(self.dtype, capabilities))
        self.request = self.compiled.create_infer_request()
        # Element type and per-block dims [kv_heads, rows, head_size] the device chose; u8
        # keys carry their quantisation scales in extra rows.
        self._key_layout = self._cache_layout(key_cache_name(0))
        self._value_layout = self._cache_layout(value_cache_name(0))
        self.sampler = Sampler(torch.device("cpu"), config.model.seed)
        self.kv_caches: list[Any] = []
        self._step_arrays: dict[str, np.ndarray] = {}
        logger.info("OpenVINO model ready in %.1f s on %s: inference precision %s, KV cache %s %s",
                    time.perf_counter() - start, options.device,
                    self.compiled.get_property("INFERENCE_PRECISION_HINT"), *self._key_layout)

    def _cache_layout(self, name: str) -> tuple[Any, tuple[int, ...]]:
        port = self.compiled.input(name)
        shape = port.get_partial_shape()
        dims = tuple(shape[i].get_length() for i in range(1, shape.rank.get_length()))
        return port.get_element_type(), dims

    # -- memory -------------------------------------------------------------------------

    def weights_bytes(self) -> int:
        return self.converted.weights_bytes()

    def kv_block_bytes(self) -> int:
        """Bytes one block takes across all layers (keys and values, quantisation scales included)."""
        per_layer = sum(int(np.prod(dims)) * dtype.size
                        for dtype, dims in (self._key_layout, self._value_layout))
        return per_layer * self.num_layers

    def _allocate(self, num_blocks: int) -> list[Any]:
        import openvino as ov

        caches = []
        for _ in range(self.num_layers):
            for dtype, dims in (self._key_layout, self._value_layout):
                caches.append(ov.Tensor(dtype, [num_blocks, *dims]))
        return caches

    def _bind(self, caches: list[Any]) -> None:
        for layer in range(self.num_layers):
            self.request.set_tensor(key_cache_name(layer), caches[2 * layer])
            self.request.set_tensor(value_cache_name(layer), caches[2 * layer + 1])

    def initialize_cache(self, num_blocks: int) -> None:
        self.kv_caches = self._allocate(num_blocks)
        self._bind(self.kv_caches)

    def profile_run(self, num_tokens: int) -> float:
        """One dummy step over `num_tokens` tokens with a throw-away cache (a warm-up: the
        KV budget on this platform is a fixed size, not derived from this run)."""
        meta, num_blocks = profile_metadata(num_tokens, self.model_max_len, self.block_size,
                                            torch.device("cpu"))
        scratch = self._allocate(num_blocks)
        self._bind(scratch)
        start = time.perf_counter()
        self._infer(torch.zeros(meta.num_tokens, dtype=torch.long), meta.positions, meta,
                    [meta.num_tokens - 1])
        seconds = time.perf_counter() - start
        if self.kv_caches:
            self._bind(self.kv_caches)
        del scratch
        return seconds

    # -- one step -----------------------------------------------------------------------

    def execute_model(self, sched: SchedulerOutput) -> ModelRunnerOutput:
        if sched.is_empty:
            return ModelRunnerOutput()
        inputs: StepInputs = prepare_inputs(sched, self.block_size, torch.device("cpu"))
        rows = inputs.logits_rows()
        if not rows:
            return ModelRunnerOutput()
        logits = self._infer(inputs.input_ids, inputs.positions, inputs.meta, rows)
        return outputs_from_logits(inputs, logits, self.sampler)

    def _infer(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: Any,
               rows: list[int]) -> torch.Tensor:
        """One inference; float32 logits [len(rows), vocab] (valid until the next call)."""
        import openvino as ov

        seq_lens = np.asarray(meta.seq_lens_cpu, dtype=np.int32)
        query_start = np.asarray(meta.query_start_loc_cpu, dtype=np.int32)
        blocks_per_seq = -(-seq_lens // self.block_size)
        table = meta.block_tables.numpy()
        block_indices = np.concatenate([table[i, :n] for i, n in enumerate(blocks_per_seq)])
        begins = np.zeros(len(seq_lens) + 1, dtype=np.int32)
        np.cumsum(blocks_per_seq, out=begins[1:])
        arrays = {
            "input_ids": input_ids.numpy(),
            "positions": positions.numpy(),
            "past_lens": seq_lens - np.diff(query_start),
            "subsequence_begins": query_start,
            "block_indices": block_indices.astype(np.int32),
            "block_indices_begins": begins,
            "max_context_len": np.array(meta.max_seq_len, dtype=np.int32),
            "logits_indices": np.asarray(rows, dtype=np.int64),
        }
        # The request reads these arrays' memory in place: keep them alive until the next
        # step. np.require keeps 0-d arrays 0-d (np.ascontiguousarray makes them 1-d).
        self._step_arrays = {name: np.require(a, requirements="C") for name, a in arrays.items()}
        for name, array in self._step_arrays.items():
            self.request.set_tensor(name, ov.Tensor(array, shared_memory=True))
        self.request.infer()
        return torch.from_numpy(self.request.get_output_tensor(0).data)



def _compile(core: Any, model: Any, device: str, properties: dict[str, Any]) -> Any:
    """`core.compile_model`, with a refusal of the device turned into a ValueError that names
    the settings to change (e.g. a bf16 KV cache with f32 inference on the CPU)."""
    try:
        return core.compile_model(model, device, properties)
    except RuntimeError as e:
        reason = next((line for line in reversed(str(e).splitlines()) if line.strip()), str(e))
        settings = ", ".join(f"{k}={v}" for k, v in properties.items())
        raise ValueError(f"OpenVINO cannot compile the model for {device} with {settings}: "
                         f"{reason.strip()}. Change HERON_OPENVINO_INFERENCE_PRECISION or "
                         "HERON_OPENVINO_KV_CACHE_PRECISION (or the model dtype)") from e
