"""What every endpoint shares: the server state, model-name checks, prompt checks, submission."""
from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from starlette.responses import Response

from heron.core.async_engine import (AsyncLLMEngine, EngineDeadError, EngineOverloadedError,
                                     RequestStream)
from heron.core.outputs import RequestOutput
from heron.core.sampling_params import SamplingParams
from heron.core.tokenizer import check_unicode
from heron.entrypoints.openai.errors import OpenAIError, bad_request
from heron.entrypoints.openai.metrics import ServerMetrics
from heron.entrypoints.openai.streaming import (ClientDisconnected, final_outputs,
                                                unless_disconnected)


@dataclass
class EnginePrompt:
    """A prompt ready for the engine: its token ids and, when known, its text."""
    token_ids: list[int]
    text: str | None = None

    def as_engine_input(self) -> dict[str, Any]:
        return {"prompt": self.text, "prompt_token_ids": self.token_ids}


@dataclass
class ServerState:
    """Everything the endpoints need, built once by `api_server`."""
    engine: AsyncLLMEngine
    # The server's own tokenizer: the engine thread uses the engine's, and sharing one
    # Rust tokenizer between threads is not guaranteed safe.
    tokenizer: Any
    served_model_names: list[str]
    max_model_len: int
    model_path: str
    metrics: ServerMetrics
    chat_template: str | None = None
    api_key: str | None = None
    response_role: str = "assistant"
    created: int = field(default_factory=lambda: int(time.time()))

    def check_model(self, name: str | None) -> str:
        """The model name to echo back; 404 in OpenAI's shape for an unknown one."""
        if name is None or name == "":
            return self.served_model_names[0]
        if name not in self.served_model_names:
            raise OpenAIError(404, f"The model '{name}' does not exist. This server serves "
                              f"{', '.join(repr(n) for n in self.served_model_names)}.",
                              param="model", code="model_not_found")
        return name

    def check_length(self, num_prompt_tokens: int, max_tokens: int | None,
                     param: str = "prompt") -> None:
        """400 naming the context limit when the prompt (plus max_tokens) does not fit."""
        limit = self.max_model_len
        if num_prompt_tokens >= limit:
            raise bad_request(
                f"This model's maximum context length is {limit} tokens, but the prompt has "
                f"{num_prompt_tokens} tokens (at least one token must be generated). Please "
                "shorten the prompt.", param)
        if max_tokens is not None and num_prompt_tokens + max_tokens > limit:
            raise bad_request(
                f"This model's maximum context length is {limit} tokens. However, you requested "
                f"{num_prompt_tokens + max_tokens} tokens ({num_prompt_tokens} in the prompt, "
                f"{max_tokens} for the completion). Please reduce the length of the prompt or "
                "max_tokens.", "max_tokens")

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        try:
            check_unicode(text)
        except ValueError as e:
            raise bad_request(str(e), "prompt") from None
        return list(self.tokenizer.encode(text, add_special_tokens=add_special_tokens))

    def render_chat(self, messages: list[dict[str, Any]], template: str | None,
                    add_generation_prompt: bool, kwargs: dict[str, Any] | None) -> list[int]:
        """Token ids of a conversation through the chat template (as `LLM.chat` does)."""
        template = template or self.chat_template
        if template is None and not getattr(self.tokenizer, "chat_template", None):
            raise bad_request("this model has no chat template: start the server with "
                              "--chat-template FILE_OR_STRING, or pass chat_template in the "
                              "request", "messages")
        try:
            ids = self.tokenizer.apply_chat_template(
                messages, chat_template=template, tokenize=True,
                add_generation_prompt=add_generation_prompt, **(kwargs or {}))
        except Exception as e:  # jinja errors, raise_exception() in templates, bad roles
            raise bad_request(f"the chat template failed on these messages: {e}",
                              "messages") from e
        if isinstance(ids, dict) or hasattr(ids, "input_ids"):
            ids = ids["input_ids"]
        return list(ids)


def load_chat_template(value: str | None) -> str | None:
    """--chat-template: a file path, or the template itself on one line."""
    if value is None:
        return None
    path = Path(value).expanduser()
    if path.is_file():
        return path.read_text()
    if any(c in value for c in "{}%"):
        return value
    raise ValueError(f"--chat-template {value!r} is neither a file nor a Jinja template")


# What a 503 for a full waiting queue tells clients to wait before trying again.
RETRY_AFTER_SECONDS = 1


def random_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


async def submit(state: ServerState, request_id: str, prompts: list[EnginePrompt],
                 params: SamplingParams) -> list[RequestStream]:
    """Queue one engine request per prompt; all or none (a rejection aborts the others)."""
    streams: list[RequestStream] = []
    try:
        for i, prompt in enumerate(prompts):
            rid = request_id if len(prompts) == 1 else f"{request_id}-{i}"
            streams.append(await state.engine.add_request(rid, prompt.as_engine_input(), params))
    except BaseException as e:
        for stream in streams:
            stream.close()
        if isinstance(e, ValueError):
            raise bad_request(str(e)) from e
        if isinstance(e, EngineDeadError):
            raise OpenAIError(500, str(e)) from e
        if isinstance(e, EngineOverloadedError):
            raise OpenAIError(503, str(e), code="overloaded",
                              headers={"Retry-After": str(RETRY_AFTER_SECONDS)}) from e
        raise
    return streams


def close_all(streams: list[RequestStream]) -> None:
    for stream in streams:
        stream.close()


async def collect_finished(streams: list[RequestStream], raw: Any) -> list[RequestOutput] | Response:
    """The final output of each stream for a non-streaming response; a 499 response if
    the client left first. The streams are closed (unfinished requests aborted) either way."""
    try:
        return await unless_disconnected(final_outputs(streams), raw)
    except ClientDisconnected:
        return Response(status_code=499)  # nobody reads it; the requests are aborted below
    except EngineDeadError as e:
        raise OpenAIError(500, str(e)) from e
    finally:
        close_all(streams)


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}
