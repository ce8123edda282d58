"""POST /v1/completions: one engine request per prompt, n choices each, streamed or not."""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, AsyncIterator

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from heron.core.async_engine import EngineDeadError, RequestStream
from heron.core.outputs import CompletionOutput, RequestOutput
from heron.entrypoints.openai.errors import error_body
from heron.entrypoints.openai.logprobs import completion_logprobs
from heron.entrypoints.openai.protocol import CompletionRequest
from heron.entrypoints.openai.serving import (EnginePrompt, ServerState, close_all,
                                              collect_finished, random_id,
                                              submit, usage)
from heron.entrypoints.openai.streaming import DONE, ChoiceTracker, merge_streams, sse


@dataclass
class _Completion:
    """One /v1/completions call: what every chunk and the final body repeat."""
    state: ServerState
    body: CompletionRequest
    model: str
    request_id: str
    created: int
    prompts: list[EnginePrompt]

    def header(self) -> dict[str, Any]:
        return {"id": self.request_id, "object": "text_completion", "created": self.created,
                "model": self.model}

    def prompt_text(self, index: int) -> str:
        prompt = self.prompts[index]
        if prompt.text is None:  # token-id prompts are echoed as their decoded text
            prompt.text = self.state.tokenizer.decode(prompt.token_ids)
        return prompt.text

    def echo_logprobs(self, output: RequestOutput) -> dict[str, list]:
        return completion_logprobs(output.prompt_token_ids, output.prompt_logprobs or [],
                                   self.body.logprobs or 0, self.state.tokenizer)


async def create_completion(state: ServerState, body: CompletionRequest,
                            raw: Request) -> Response:
    """Answer one completions request (the body is already parsed)."""
    model = state.check_model(body.model)
    params = body.to_sampling_params()
    prompts = []
    for prompt in body.prompts():
        if isinstance(prompt, str):
            prompts.append(EnginePrompt(state.encode(prompt, body.add_special_tokens), prompt))
        else:
            prompts.append(EnginePrompt(list(prompt)))
        state.check_length(len(prompts[-1].token_ids), body.max_tokens)
    call = _Completion(state, body, model, random_id("cmpl"), int(time.time()), prompts)
    streams = await submit(state, call.request_id, prompts, params)
    if body.stream:
        return StreamingResponse(_stream(call, streams), media_type="text/event-stream")
    outputs = await collect_finished(streams, raw)
    if isinstance(outputs, Response):
        return outputs
    return JSONResponse(_full_response(call, outputs))


def _full_response(call: _Completion, outputs: list[RequestOutput]) -> dict[str, Any]:
    body = call.body
    choices = []
    prompt_tokens = completion_tokens = 0
    for prompt_index, output in enumerate(outputs):
        prompt_tokens += len(output.prompt_token_ids)
        for c in output.outputs:
            completion_tokens += len(c.token_ids)
            prefix = call.prompt_text(prompt_index) if body.echo else ""
            logprobs = None
            if body.logprobs is not None:
                logprobs = _generated_logprobs(call, c, 0, len(c.token_ids), len(prefix))
                if body.echo:
                    logprobs = _join(call.echo_logprobs(output), logprobs)
            choices.append({"index": prompt_index * body.n + c.index, "text": prefix + c.text,
                            "logprobs": logprobs, "finish_reason": c.finish_reason,
                            "stop_reason": c.stop_reason})
    return {**call.header(), "choices": choices, "usage": usage(prompt_tokens, completion_tokens)}


def _generated_logprobs(call: _Completion, c: CompletionOutput, start: int, end: int,
                        text_offset: int) -> dict[str, list]:
    return completion_logprobs(c.token_ids[start:end], (c.logprobs or [])[start:end],
                               call.body.logprobs or 0, call.state.tokenizer, text_offset)


def _join(a: dict[str, list], b: dict[str, list]) -> dict[str, list]:
    return {key: a[key] + b[key] for key in a}


async def _stream(call: _Completion, streams: list[RequestStream]) -> AsyncIterator[str]:
    body = call.body
    trackers: dict[int, ChoiceTracker] = {}
    stops = list(body.stop) if isinstance(body.stop, list) else ([body.stop] if body.stop else [])
    prompt_tokens = completion_tokens = 0
    try:
        async for prompt_index, output in merge_streams(streams):
            for c in output.outputs:
                index = prompt_index * body.n + c.index
                tracker = trackers.get(index)
                if tracker is None:
                    tracker = trackers[index] = ChoiceTracker(stops)
                chunk = _chunk(call, tracker, index, prompt_index, output, c)
                if chunk is not None:
                    yield sse(chunk)
            if output.finished:
                prompt_tokens += len(output.prompt_token_ids)
                completion_tokens += sum(len(c.token_ids) for c in output.outputs)
        if body.include_usage:
            yield sse({**call.header(), "choices": [],
                       "usage": usage(prompt_tokens, completion_tokens)})
    except EngineDeadError as e:
        yield sse(error_body(500, str(e)))
    finally:
        close_all(streams)
    yield DONE


def _chunk(call: _Completion, tracker: ChoiceTracker, index: int, prompt_index: int,
           output: RequestOutput, c: CompletionOutput) -> dict[str, Any] | None:
    body = call.body
    sent_before = tracker.sent_chars
    delta = tracker.advance(c)
    if delta is None:
        return None
    echo_now = body.echo and not tracker.prefix_sent
    prefix = call.prompt_text(prompt_index) if echo_now else ""
    tracker.prefix_sent = tracker.prefix_sent or echo_now
    logprobs = None
    if body.logprobs is not None and (delta.token_end > delta.token_start or echo_now):
        base = len(call.prompt_text(prompt_index)) if body.echo else 0
        logprobs = _generated_logprobs(call, c, delta.token_start, delta.token_end,
                                       base + sent_before)
        if echo_now:
            logprobs = _join(call.echo_logprobs(output), logprobs)
    text = prefix + delta.text
    if not text and logprobs is None and delta.finish_reason is None:
        return None
    return {**call.header(), "choices": [{
        "index": index, "text": text, "logprobs": logprobs,
        "finish_reason": delta.finish_reason, "stop_reason": delta.stop_reason}]}
