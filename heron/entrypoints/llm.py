"""The offline API, as in vLLM: `LLM(model).generate(prompts, sampling_params)`."""
from __future__ import annotations

from typing import Any, Sequence

from tqdm.auto import tqdm

from heron.config import EngineConfig
from heron.core.engine import LLMEngine, PromptType
from heron.core.outputs import RequestOutput
from heron.core.sampling_params import SamplingParams


class LLM:
    """An engine for offline batched generation.

    `model` is a local Hugging Face folder (config.json + .safetensors); None uses the
    embedded default model (SmolLM2-135M-Instruct). Other keyword arguments are vLLM's
    engine arguments: dtype, max_model_len, enable_prefix_caching, device, seed,
    block_size, max_num_seqs, max_num_batched_tokens, kv_cache_memory_bytes, kv_cache_dtype,
    tensor_parallel_size, distributed_executor_backend, ...
    """

    def __init__(self, model: str | None = None, **kwargs: Any) -> None:
        self.llm_engine = LLMEngine(EngineConfig.create(model=model, **kwargs))

    def shutdown(self) -> None:
        """Stop the engine's worker processes now (they also stop when this object is
        garbage-collected or the interpreter exits)."""
        self.llm_engine.shutdown()

    def get_tokenizer(self) -> Any:
        return self.llm_engine.tokenizer

    def generate(self, prompts: PromptType | Sequence[PromptType],
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
                 use_tqdm: bool = True) -> list[RequestOutput]:
        """Generate for one prompt or a list of them; outputs come back in input order.

        A prompt is a string, a list of token ids, or {"prompt": ...} /
        {"prompt_token_ids": [...]}. One SamplingParams applies to all prompts; a list
        must match the prompts one to one."""
        prompt_list = _as_prompt_list(prompts)
        if sampling_params is None or isinstance(sampling_params, SamplingParams):
            params_list = [sampling_params or SamplingParams()] * len(prompt_list)
        else:
            params_list = list(sampling_params)
            if len(params_list) != len(prompt_list):
                raise ValueError(f"got {len(params_list)} SamplingParams for {len(prompt_list)} "
                                 "prompts: pass one, or one per prompt")
        engine = self.llm_engine
        ids = []
        try:
            for prompt, params in zip(prompt_list, params_list):
                ids.append(engine.add_request(None, prompt, params))
        except Exception:
            engine.abort_request(ids)  # a bad prompt fails the call, not the engine
            raise
        return self._run(ids, use_tqdm)

    def chat(self, messages: list[dict[str, Any]] | list[list[dict[str, Any]]],
             sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
             use_tqdm: bool = True, chat_template: str | None = None,
             add_generation_prompt: bool = True) -> list[RequestOutput]:
        """Generate replies to one conversation (or a list of them) through the chat template."""
        conversations = messages if messages and isinstance(messages[0], list) else [messages]
        tokenizer = self.get_tokenizer()
        prompts: list[PromptType] = []
        for conversation in conversations:
            token_ids = tokenizer.apply_chat_template(
                conversation, chat_template=chat_template, tokenize=True,
                add_generation_prompt=add_generation_prompt)
            if isinstance(token_ids, dict) or hasattr(token_ids, "input_ids"):
                token_ids = token_ids["input_ids"]
            text = tokenizer.decode(token_ids)
            prompts.append({"prompt": text, "prompt_token_ids": list(token_ids)})
        return self.generate(prompts, sampling_params, use_tqdm=use_tqdm)

    def _run(self, ids: list[str], use_tqdm: bool) -> list[RequestOutput]:
        engine = self.llm_engine
        wanted = set(ids)
        finished: dict[str, RequestOutput] = {}
        bar = tqdm(total=len(ids), desc="Processed prompts", disable=not use_tqdm)
        try:
            while len(finished) < len(ids):
                for output in engine.step():
                    if output.finished and output.request_id in wanted:
                        finished[output.request_id] = output
                        bar.update(1)
        except BaseException:
            engine.abort_request([i for i in ids if i not in finished])
            raise
        finally:
            bar.close()
        return [finished[i] for i in ids]


def _as_prompt_list(prompts: Any) -> list[PromptType]:
    if isinstance(prompts, (str, dict)):
        return [prompts]
    if isinstance(prompts, Sequence) and prompts and all(isinstance(t, int) for t in prompts):
        return [prompts]  # one prompt given as token ids
    return list(prompts)
