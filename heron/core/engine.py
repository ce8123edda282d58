"""LLMEngine: requests in, RequestOutputs out, one `step()` at a time.

The engine validates input, fans `n > 1` out into n sequences, asks the scheduler
what to compute, has the executor compute it, and turns sampled tokens into text
(stop strings end a request here). Errors a user causes are raised from
`add_request` before any state changes, so other requests keep running.
"""
from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field
from typing import Any, Sequence

from heron.config import EngineConfig
from heron.core.detokenizer import IncrementalDetokenizer
from heron.core.outputs import CompletionOutput, RequestMetrics, RequestOutput
from heron.core.request import Request, RequestStatus
from heron.core.sampling_params import SamplingParams
from heron.core.scheduler import Scheduler
from heron.core.spec_decode.stats import SpecDecodingStats
from heron.core.tokenizer import check_unicode, load_tokenizer, resolve_eos_token_ids
from heron.logger import get_logger
from heron.worker.executor import executor_class

logger = get_logger(__name__)

# A prompt: text, token ids, or vLLM's TextPrompt / TokensPrompt dicts.
PromptType = str | Sequence[int] | dict[str, Any]


@dataclass
class _Sequence:
    """Engine-side state of one generated sequence (one of a request's n)."""
    request: Request
    parent_id: str
    index: int
    detokenizer: IncrementalDetokenizer


@dataclass
class _Parent:
    """A user's request: its prompt and its n sequences."""
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    sequences: list[_Sequence] = field(default_factory=list)
    metrics: RequestMetrics | None = None

    @property
    def finished(self) -> bool:
        return all(s.request.is_finished for s in self.sequences)


class LLMEngine:
    def __init__(self, config: EngineConfig) -> None:
        from heron.platforms.registry import resolve_platform

        self.platform = resolve_platform(config.device.device)
        reasons = self.platform.validate(config)
        if reasons:
            raise ValueError(f"platform {self.platform.name!r} cannot run this configuration: "
                             + "; ".join(reasons))
        self.config = config = self.platform.complete_config(config)
        model_path = _model_folder(config.model.model)
        self.model_path = model_path
        _check_model_split(config, model_path)
        self.tokenizer = load_tokenizer(config.model.tokenizer or model_path)
        self.eos_token_ids = resolve_eos_token_ids(model_path, self.tokenizer)
        self.executor = executor_class(config, self.platform)(config, self.platform, model_path)
        try:
            self._set_up_cache()
        except BaseException:
            self.executor.shutdown()   # no worker process outlives a failed start
            raise
        self.scheduler = Scheduler(config.scheduler, config.cache, self.num_blocks,
                                   self.max_model_len, config.speculative)
        self.vocab_size = self.executor.vocab_size
        self._parents: dict[str, _Parent] = {}
        self._sequences: dict[str, _Sequence] = {}
        self._ids = itertools.count()
        logger.info("platform %s, %d KV blocks of %d tokens (%d tokens), max_model_len %d%s",
                    self.platform.name, self.num_blocks, config.cache.block_size,
                    self.num_blocks * config.cache.block_size, self.max_model_len,
                    _describe_parallel(config))

    def _set_up_cache(self) -> None:
        self.max_model_len = self._resolve_max_model_len()
        self._check_budget()
        num_blocks = self.executor.determine_num_blocks()
        self._check_capacity(num_blocks)
        self.executor.initialize_cache(num_blocks)
        self.num_blocks = num_blocks

    def _resolve_max_model_len(self) -> int:
        model_max = self.executor.model_max_len
        wanted = self.config.model.max_model_len
        if wanted is None:
            return model_max
        if wanted > model_max:
            raise ValueError(f"max_model_len={wanted} is longer than the model's context "
                             f"({model_max}); use at most {model_max}")
        return wanted

    def _check_budget(self) -> None:
        sched = self.config.scheduler
        if not sched.enable_chunked_prefill and sched.max_num_batched_tokens < self.max_model_len:
            raise ValueError(
                f"without chunked prefill a whole prompt must fit one step: "
                f"max_num_batched_tokens ({sched.max_num_batched_tokens}) must be at least "
                f"max_model_len ({self.max_model_len}); raise it, lower max_model_len or enable "
                "chunked prefill")

    def _check_capacity(self, num_blocks: int) -> None:
        capacity = num_blocks * self.config.cache.block_size
        if capacity < self.max_model_len:
            raise ValueError(
                f"the KV cache holds {capacity} tokens ({num_blocks} blocks), fewer than "
                f"max_model_len={self.max_model_len}: give it more memory "
                "(HERON_CPU_KVCACHE_SPACE, kv_cache_memory_bytes, num_gpu_blocks_override) "
                "or lower max_model_len")

    # -- requests -----------------------------------------------------------------------

    def add_request(self, request_id: str | None, prompt: PromptType,
                    params: SamplingParams | None = None,
                    arrival_time: float | None = None) -> str:
        """Queue a request; raises ValueError on bad input without touching other requests."""
        params = params or SamplingParams()
        request_id = str(next(self._ids)) if request_id is None else str(request_id)
        if request_id in self._parents:
            raise ValueError(f"request id {request_id!r} is already in use")
        text, token_ids = self._tokenize(prompt)
        self._validate_prompt(token_ids)
        self._validate_params(params)
        params = params.clone(eos_token_ids=set(self.eos_token_ids))
        max_tokens = self.max_model_len - len(token_ids)
        if params.max_tokens is not None:
            max_tokens = min(max_tokens, params.max_tokens)
        arrival = arrival_time if arrival_time is not None else time.monotonic()
        parent = _Parent(request_id, text, token_ids, params, metrics=RequestMetrics(arrival))
        for index in range(params.n):
            child_params = params
            if params.n > 1 and params.seed is not None:
                child_params = params.clone(seed=params.seed + index)
            seq_id = request_id if params.n == 1 else f"{index}_{request_id}"
            request = Request(seq_id, token_ids, child_params, prompt=text, arrival_time=arrival,
                              max_tokens=max_tokens)
            detok = IncrementalDetokenizer(self.tokenizer, token_ids, params.skip_special_tokens,
                                           params.stop, params.include_stop_str_in_output,
                                           params.min_tokens)
            parent.sequences.append(_Sequence(request, request_id, index, detok))
        self._parents[request_id] = parent
        for seq in parent.sequences:
            self._sequences[seq.request.request_id] = seq
            self.scheduler.add_request(seq.request)
        return request_id

    def _tokenize(self, prompt: PromptType) -> tuple[str | None, list[int]]:
        if isinstance(prompt, dict):
            if "prompt_token_ids" in prompt:
                return prompt.get("prompt"), list(prompt["prompt_token_ids"])
            if "prompt" in prompt:
                prompt = prompt["prompt"]
            else:
                raise ValueError("a prompt dict needs 'prompt' (text) or 'prompt_token_ids'")
        if isinstance(prompt, str):
            if not prompt:
                raise ValueError("the prompt is empty: give at least one character or token")
            check_unicode(prompt)
            return prompt, self.tokenizer.encode(prompt)
        if isinstance(prompt, Sequence) and all(isinstance(t, int) for t in prompt):
            return None, list(prompt)
        raise ValueError(f"a prompt must be a string, a list of token ids or a dict, "
                         f"got {type(prompt).__name__}")

    def _validate_prompt(self, token_ids: list[int]) -> None:
        if not token_ids:
            raise ValueError("the prompt is empty: give at least one character or token")
        if len(token_ids) >= self.max_model_len:
            raise ValueError(
                f"the prompt has {len(token_ids)} tokens, but max_model_len is "
                f"{self.max_model_len} and at least one token must be generated: shorten the "
                "prompt or raise max_model_len")
        self._check_in_vocabulary(token_ids, "token id")

    def _validate_params(self, params: SamplingParams) -> None:
        """What SamplingParams cannot check alone: token ids against this model."""
        self._check_in_vocabulary(params.stop_token_ids, "stop_token_ids:")

    def _check_in_vocabulary(self, token_ids: Sequence[int], what: str) -> None:
        bad = [t for t in token_ids if not 0 <= t < self.vocab_size]
        if bad:
            raise ValueError(f"{what} {bad[0]} is outside the vocabulary (0..{self.vocab_size - 1})")

    def abort_request(self, request_ids: str | Sequence[str]) -> None:
        """Stop requests and free their KV blocks; unknown ids are ignored."""
        if isinstance(request_ids, str):
            request_ids = [request_ids]
        for request_id in request_ids:
            parent = self._parents.pop(request_id, None)
            if parent is None:
                continue
            seq_ids = [s.request.request_id for s in parent.sequences]
            self.scheduler.finish_requests(seq_ids, RequestStatus.FINISHED_ABORTED)
            for seq_id in seq_ids:
                self._sequences.pop(seq_id, None)

    def has_unfinished_requests(self) -> bool:
        return bool(self._parents)

    def check_health(self) -> None:
        """Raise if the model's workers are known to be gone (cheap; any thread)."""
        self.executor.check_health()

    def shutdown(self) -> None:
        """Stop the executor's workers (other processes or hosts); safe to call twice."""
        self.executor.shutdown()

    def get_num_unfinished_requests(self) -> int:
        return len(self._parents)

    @property
    def spec_decoding_stats(self) -> SpecDecodingStats:
        """Speculative decoding counters since start (all zero without speculation)."""
        return self.scheduler.spec_stats.copy()

    # -- one step -----------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """Schedule, run the model once, and return outputs of requests that progressed."""
        sched = self.scheduler.schedule()
        if sched.is_empty:
            if self.scheduler.num_waiting and not self.scheduler.num_running:
                # Cannot happen while max_model_len fits the cache; fail loudly, never spin.
                raise RuntimeError(f"no request could be scheduled: {self.scheduler.num_waiting} "
                                   f"waiting, {self.scheduler.kv.num_free_blocks} free KV blocks")
            return []
        result = self.executor.execute_model(sched)
        updated = self.scheduler.update_from_output(sched, result)
        now = time.monotonic()
        touched: dict[str, _Parent] = {}
        for request, new_tokens in updated:
            seq = self._sequences[request.request_id]
            if request.first_token_time is None:
                request.first_token_time = now
            self._detokenize(seq, new_tokens)
            touched[seq.parent_id] = self._parents[seq.parent_id]
        return [self._make_output(parent, now) for parent in touched.values()]

    def _detokenize(self, seq: _Sequence, new_tokens: list[int]) -> None:
        """Text for the step's new tokens, one at a time: a stop string ends the request at
        the token that completes it, and tokens after it (accepted speculative tokens)
        are dropped, exactly as if they had never been generated."""
        request = seq.request
        first = request.num_output_tokens - len(new_tokens)
        for i, token in enumerate(new_tokens):
            stop = seq.detokenizer.update([token], first + i + 1)
            if stop is None:
                continue
            if i < len(new_tokens) - 1:
                request.truncate_output(first + i + 1)
                new_tokens = new_tokens[:i + 1]
                if request.is_finished:   # by a token that is now dropped
                    request.status = RequestStatus.FINISHED_STOPPED
                    request.stop_reason = stop
            if not request.is_finished:
                request.stop_reason = stop
                self.scheduler.finish_requests([request.request_id],
                                               RequestStatus.FINISHED_STOPPED)
            break
        if request.logprobs:
            for position in request.logprobs[-len(new_tokens):]:
                for token_id, logprob in position.items():
                    logprob.decoded_token = self.tokenizer.decode([token_id])

    def _make_output(self, parent: _Parent, now: float) -> RequestOutput:
        outputs = []
        for seq in parent.sequences:
            r = seq.request
            outputs.append(CompletionOutput(
                index=seq.index, text=seq.detokenizer.text, token_ids=list(r.output_token_ids),
                cumulative_logprob=r.cumulative_logprob if r.logprobs is not None else None,
                logprobs=r.logprobs, finish_reason=r.status.finish_reason,
                stop_reason=r.stop_reason))
        first = parent.sequences[0].request
        metrics = parent.metrics
        if metrics is not None:
            metrics.first_scheduled_time = first.first_scheduled_time
            metrics.first_token_time = first.first_token_time
        finished = parent.finished
        if finished:
            if metrics is not None:
                metrics.finished_time = now
            self._parents.pop(parent.request_id, None)
            for seq in parent.sequences:
                self._sequences.pop(seq.request.request_id, None)
        return RequestOutput(
            request_id=parent.request_id, prompt=parent.prompt,
            prompt_token_ids=parent.prompt_token_ids,
            prompt_logprobs=self._decoded_prompt_logprobs(first),
            outputs=outputs, finished=finished, num_cached_tokens=max(first.num_cached_tokens, 0),
            metrics=metrics)

    def _decoded_prompt_logprobs(self, request: Request):
        if request.prompt_logprobs is None:
            return None
        for position in request.prompt_logprobs:
            for token_id, logprob in (position or {}).items():
                if logprob.decoded_token is None:
                    logprob.decoded_token = self.tokenizer.decode([token_id])
        return request.prompt_logprobs


def _check_model_split(config: EngineConfig, model_path: str) -> None:
    """Refuse, before any worker starts, a tensor-parallel size the model cannot take."""
    tp = config.parallel.tensor_parallel_size
    if tp == 1:
        return
    from heron.models.loader import describe_model
    from heron.models.tensor_parallel import tensor_parallel_problems

    model = describe_model(model_path, config.model.dtype)
    problems = tensor_parallel_problems(model.hf_config, model.model_cls, tp)
    if problems:
        raise ValueError(f"cannot split {model_path} over tensor_parallel_size={tp}: "
                         + "; ".join(problems))


def _describe_parallel(config: EngineConfig) -> str:
    parallel = config.parallel
    if parallel.world_size == 1:
        return ""
    return (f", tensor parallel {parallel.tensor_parallel_size} "
            f"({parallel.executor_backend} executor)")


def _model_folder(model: str | None) -> str:
    """The Hugging Face folder to run: the model's own, the embedded default's, or for a
    GGUF file the folder of its config and tokenizer (the weights stay in the file)."""
    if model is None:
        return _default_model_path()
    from heron.models.gguf_file import gguf_model_folder, is_gguf_file
    return gguf_model_folder(model) if is_gguf_file(model) else model


def _default_model_path() -> str:
    from heron.models.default_model import default_model_path
    return default_model_path()
