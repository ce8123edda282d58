"""POST /v1/chat/completions: messages through the chat template, n choices, streamed or not."""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, AsyncIterator

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from heron.core.async_engine import EngineDeadError, RequestStream
from heron.core.outputs import CompletionOutput, RequestOutput
from heron.entrypoints.openai.errors import error_body
from heron.entrypoints.openai.logprobs import chat_logprobs
from heron.entrypoints.openai.protocol import ChatCompletionRequest
from heron.entrypoints.openai.serving import (EnginePrompt, ServerState, collect_finished,
                                              random_id, submit, usage)
from heron.entrypoints.openai.streaming import DONE, ChoiceTracker, sse


@dataclass
class _Chat:
    """One chat call: what every chunk and the final body repeat."""
    state: ServerState
    body: ChatCompletionRequest
    model: str
    request_id: str
    created: int

    def header(self, streaming: bool) -> dict[str, Any]:
        return {"id": self.request_id,
                "object": "chat.completion.chunk" if streaming else "chat.completion",
                "created": self.created, "model": self.model}

    def logprobs(self, c: CompletionOutput, start: int, end: int) -> dict[str, list] | None:
        if not self.body.logprobs:
            return None
        return chat_logprobs(c.token_ids[start:end], (c.logprobs or [])[start:end],
                             self.body.top_logprobs or 0, self.state.tokenizer)


async def create_chat_completion(state: ServerState, body: ChatCompletionRequest,
                                 raw: Request) -> Response:
    """Answer one chat request (the body is already parsed)."""
    model = state.check_model(body.model)
    params = body.to_sampling_params()
    token_ids = state.render_chat(body.conversation(), body.chat_template,
                                  body.add_generation_prompt, body.chat_template_kwargs)
    state.check_length(len(token_ids), params.max_tokens, "messages")
    call = _Chat(state, body, model, random_id("chatcmpl"), int(time.time()))
    streams = await submit(state, call.request_id, [EnginePrompt(token_ids)], params)
    if body.stream:
        return StreamingResponse(_stream(call, streams[0]), media_type="text/event-stream")
    outputs = await collect_finished(streams, raw)
    if isinstance(outputs, Response):
        return outputs
    return JSONResponse(_full_response(call, outputs[0]))


def _full_response(call: _Chat, output: RequestOutput) -> dict[str, Any]:
    choices = [{"index": c.index,
                "message": {"role": call.state.response_role, "content": c.text},
                "logprobs": call.logprobs(c, 0, len(c.token_ids)),
                "finish_reason": c.finish_reason, "stop_reason": c.stop_reason}
               for c in output.outputs]
    completion_tokens = sum(len(c.token_ids) for c in output.outputs)
    return {**call.header(False), "choices": choices,
            "usage": usage(len(output.prompt_token_ids), completion_tokens)}


async def _stream(call: _Chat, stream: RequestStream) -> AsyncIterator[str]:
    body = call.body
    header = call.header(True)
    stops = list(body.stop) if isinstance(body.stop, list) else ([body.stop] if body.stop else [])
    trackers = [ChoiceTracker(stops) for _ in range(body.n)]
    final: RequestOutput | None = None
    try:
        # The role goes first, as OpenAI does, so clients can render the turn at once.
        for index in range(body.n):
            yield sse({**header, "choices": [{
                "index": index, "delta": {"role": call.state.response_role, "content": ""},
                "logprobs": None, "finish_reason": None}]})
        async for output in stream:
            for c in output.outputs:
                delta = trackers[c.index].advance(c)
                if delta is None:
                    continue
                logprobs = (call.logprobs(c, delta.token_start, delta.token_end)
                            if delta.token_end > delta.token_start else None)
                if not delta.text and logprobs is None and delta.finish_reason is None:
                    continue
                yield sse({**header, "choices": [{
                    "index": c.index, "delta": {"content": delta.text} if delta.text else {},
                    "logprobs": logprobs, "finish_reason": delta.finish_reason,
                    "stop_reason": delta.stop_reason}]})
            final = output
        if body.include_usage and final is not None:
            completion_tokens = sum(len(c.token_ids) for c in final.outputs)
            yield sse({**header, "choices": [],
                       "usage": usage(len(final.prompt_token_ids), completion_tokens)})
    except EngineDeadError as e:
        yield sse(error_body(500, str(e)))
    finally:
        stream.close()
    yield DONE
