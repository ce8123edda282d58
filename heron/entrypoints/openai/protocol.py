"""Request bodies of the OpenAI API (and vLLM's extra sampling fields), as pydantic models.

Unknown fields are ignored, as OpenAI's own server does for forward compatibility.
Each request turns into one `SamplingParams`; its validation errors become 400s.
"""
from __future__ import annotations

import json
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from heron.core.sampling_params import SamplingParams
from heron.entrypoints.openai.errors import OpenAIError, bad_request

# OpenAI caps top_logprobs at 20; a bigger k only costs time.
MAX_TOP_LOGPROBS = 20


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")


class StreamOptions(_Body):
    include_usage: bool = False


class _SamplingFields(_Body):
    """Fields both endpoints share; names and defaults follow OpenAI and vLLM."""
    model: str | None = None
    n: int = 1
    best_of: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    min_tokens: int = 0
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    stream: bool = False
    stream_options: StreamOptions | None = None
    logit_bias: dict[str, float] | None = None
    user: str | None = None

    def _check_unsupported(self) -> None:
        if self.logit_bias:
            raise bad_request("logit_bias is not supported by heron yet", "logit_bias")
        if self.best_of is not None and self.best_of != self.n:
            raise bad_request(f"best_of={self.best_of} differs from n={self.n}; heron returns "
                              "every sequence it generates, so best_of must equal n", "best_of")
        if self.stream_options is not None and not self.stream:
            raise bad_request("stream_options is only allowed with stream=true", "stream_options")

    def _sampling_params(self, max_tokens: int | None, logprobs: int | None,
                         prompt_logprobs: int | None = None) -> SamplingParams:
        self._check_unsupported()
        given = {name: getattr(self, name) for name in (
            "temperature", "top_p", "top_k", "min_p", "presence_penalty", "frequency_penalty",
            "repetition_penalty") if getattr(self, name) is not None}
        try:
            return SamplingParams(
                n=self.n, seed=self.seed, stop=self.stop, stop_token_ids=self.stop_token_ids,
                include_stop_str_in_output=self.include_stop_str_in_output,
                ignore_eos=self.ignore_eos, max_tokens=max_tokens, min_tokens=self.min_tokens,
                logprobs=logprobs, prompt_logprobs=prompt_logprobs,
                skip_special_tokens=self.skip_special_tokens,
                spaces_between_special_tokens=self.spaces_between_special_tokens, **given)
        except ValueError as e:
            raise bad_request(str(e).removeprefix("invalid SamplingParams: ")) from e

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


PromptInput = str | list[str] | list[int] | list[list[int]]


class CompletionRequest(_SamplingFields):
    """POST /v1/completions."""
    prompt: PromptInput
    max_tokens: int | None = 16
    echo: bool = False
    logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)
    suffix: str | None = None
    add_special_tokens: bool = True

    def to_sampling_params(self) -> SamplingParams:
        if self.suffix:
            raise bad_request("suffix is not supported by heron", "suffix")
        # echo with logprobs also reports the prompt tokens' log-probabilities.
        prompt_logprobs = self.logprobs if self.echo and self.logprobs is not None else None
        return self._sampling_params(self.max_tokens, self.logprobs, prompt_logprobs)

    def prompts(self) -> list[str | list[int]]:
        """The prompt field as a list of prompts (each text or token ids)."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if not p:
            raise bad_request("prompt is empty: give a string, a list of strings or token ids",
                              "prompt")
        if all(isinstance(x, int) for x in p):
            return [list(p)]  # type: ignore[arg-type]
        return list(p)  # type: ignore[arg-type]


class ChatCompletionRequest(_SamplingFields):
    """POST /v1/chat/completions."""
    messages: list[dict[str, Any]]
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)
    tools: list[dict[str, Any]] | None = None
    tool_choice: Any = None
    response_format: dict[str, Any] | None = None
    add_generation_prompt: bool = True
    chat_template: str | None = None
    chat_template_kwargs: dict[str, Any] | None = None

    def to_sampling_params(self) -> SamplingParams:
        if self.tools and self.tool_choice != "none":
            raise bad_request("tool calling is not supported by heron yet", "tools")
        if self.response_format and self.response_format.get("type") not in (None, "text"):
            raise bad_request("only response_format {'type': 'text'} is supported",
                              "response_format")
        if self.top_logprobs is not None and not self.logprobs:
            raise bad_request("top_logprobs needs logprobs=true", "top_logprobs")
        logprobs = (self.top_logprobs or 0) if self.logprobs else None
        max_tokens = (self.max_completion_tokens if self.max_completion_tokens is not None
                      else self.max_tokens)
        return self._sampling_params(max_tokens, logprobs)

    def conversation(self) -> list[dict[str, Any]]:
        """Messages with list-of-parts content flattened to text (only text is supported)."""
        if not self.messages:
            raise bad_request("messages is empty: give at least one message", "messages")
        out = []
        for i, message in enumerate(self.messages):
            if "role" not in message:
                raise bad_request(f"messages[{i}] has no 'role'", "messages")
            content = message.get("content")
            if isinstance(content, list):
                parts = []
                for part in content:
                    if not isinstance(part, dict) or part.get("type") != "text":
                        kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                        raise bad_request(f"messages[{i}] has a content part of type {kind!r}; "
                                          "heron serves text-only models", "messages")
                    parts.append(str(part.get("text", "")))
                message = {**message, "content": "".join(parts)}
            out.append(message)
        return out


class TokenizeRequest(_Body):
    """POST /tokenize: a prompt, or chat messages rendered through the chat template."""
    model: str | None = None
    prompt: str | None = None
    messages: list[dict[str, Any]] | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True


class DetokenizeRequest(_Body):
    """POST /detokenize."""
    model: str | None = None
    tokens: list[int]


def parse_body(model: type[_Body], raw: bytes) -> Any:
    """Parse a JSON body into `model`, turning every problem into a readable 400."""
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise bad_request(f"the request body is not valid JSON: {e}") from e
    if not isinstance(data, dict):
        raise bad_request("the request body must be a JSON object")
    try:
        return model.model_validate(data)
    except ValidationError as e:
        problems = []
        for err in e.errors()[:5]:
            loc = ".".join(str(x) for x in err["loc"])
            problems.append(f"{loc}: {err['msg']}")
        first = e.errors()[0]["loc"][0] if e.errors() else None
        raise OpenAIError(400, "invalid request: " + "; ".join(problems),
                          param=str(first) if first is not None else None) from e

