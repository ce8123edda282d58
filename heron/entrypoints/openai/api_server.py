"""The FastAPI app and `run_server`, which `heron serve` calls.

Routes: /v1/completions, /v1/chat/completions, /v1/models, /tokenize, /detokenize,
/health, /version, /metrics. Every error is answered in OpenAI's JSON shape. The API
key (when set) guards /v1/*, as in vLLM; /health and /metrics stay open for probes.
"""
from __future__ import annotations

import argparse
import contextlib
import secrets
from dataclasses import dataclass
from typing import Any, AsyncIterator, Callable

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from starlette.exceptions import HTTPException
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

import heron
from heron.config import EngineConfig
from heron.core.async_engine import AsyncLLMEngine
from heron.core.tokenizer import load_tokenizer
from heron.entrypoints.cli import parallel_kwargs
from heron.entrypoints.openai import serving_chat, serving_completion
from heron.entrypoints.openai.errors import OpenAIError, error_body, error_response, from_exception
from heron.entrypoints.openai.metrics import CONTENT_TYPE, ServerMetrics
from heron.entrypoints.openai.protocol import (ChatCompletionRequest, CompletionRequest,
                                               DetokenizeRequest, TokenizeRequest, parse_body)
from heron.entrypoints.openai.serving import ServerState, load_chat_template
from heron.logger import get_logger

logger = get_logger(__name__)

DEFAULT_MAX_BODY_BYTES = 4 * 1024 * 1024
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"   # served name of the embedded default model


class _BodyTooLarge(OpenAIError):
    def __init__(self, limit: int) -> None:
        super().__init__(413, f"the request body is larger than {limit} bytes "
                         "(--max-request-body-bytes)", code="request_too_large")


# Routes that answer without the API key: probes of load balancers and scrapers.
OPEN_PATHS = frozenset({"/health", "/metrics"})


class GuardMiddleware:
    """API-key check on every route but the probes (`OPEN_PATHS`), and a cap on the
    request body (pure ASGI: no buffering)."""

    def __init__(self, app: ASGIApp, api_key: str | None, max_body_bytes: int) -> None:
        self.app = app
        self.api_key = api_key
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        if self.api_key and scope["path"] not in OPEN_PATHS and scope["method"] != "OPTIONS":
            given = headers.get("authorization", "")
            token = given[7:] if given[:7].lower() == "bearer " else ""
            if not secrets.compare_digest(token.encode(), self.api_key.encode()):
                message = ("missing API key: send 'Authorization: Bearer KEY'" if not given
                           else "incorrect API key")
                return await error_response(401, message, code="invalid_api_key")(
                    scope, receive, send)
        length = headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > self.max_body_bytes:
            return await from_exception(_BodyTooLarge(self.max_body_bytes))(scope, receive, send)
        received = 0
        limit = self.max_body_bytes

        async def counting_receive() -> Message:
            # A chunked body has no Content-Length: count as it arrives.
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise _BodyTooLarge(limit)
            return message

        await self.app(scope, counting_receive, send)


@dataclass(frozen=True)
class CorsSettings:
    """Cross-origin requests, with vLLM's flags and defaults (`--allowed-origins` ...)."""
    allowed_origins: tuple[str, ...] = ("*",)
    allowed_credentials: bool = False
    allowed_methods: tuple[str, ...] = ("*",)
    allowed_headers: tuple[str, ...] = ("*",)


def build_app(state: ServerState, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
              cors: CorsSettings = CorsSettings()) -> FastAPI:
    """The FastAPI app serving `state`; shutting the app down shuts the engine down."""

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        state.engine.shutdown()

    app = FastAPI(title="heron OpenAI-compatible server", version=heron.__version__,
                  lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.heron = state
    app.openapi = _openapi_with_request_bodies(app, state.served_model_names)  # type: ignore[method-assign]
    app.add_middleware(GuardMiddleware, api_key=state.api_key, max_body_bytes=max_body_bytes)
    # Added last, so it runs first: a browser's preflight gets its CORS answer.
    app.add_middleware(CORSMiddleware, allow_origins=list(cors.allowed_origins),
                       allow_credentials=cors.allowed_credentials,
                       allow_methods=list(cors.allowed_methods),
                       allow_headers=list(cors.allowed_headers))
    _add_error_handlers(app)
    _add_routes(app, state)
    return app


# The bodies the POST routes parse themselves (for their own 400 messages), described in
# /openapi.json as what they are, so that clients and API fuzzers see the real fields.
_REQUEST_BODIES = {"/v1/completions": CompletionRequest,
                   "/v1/chat/completions": ChatCompletionRequest,
                   "/tokenize": TokenizeRequest, "/detokenize": DetokenizeRequest}


def _openapi_with_request_bodies(app: FastAPI,
                                 served: list[str]) -> Callable[[], dict[str, Any]]:
    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
            components = schema.setdefault("components", {}).setdefault("schemas", {})
            for path, model in _REQUEST_BODIES.items():
                body = model.model_json_schema(ref_template="#/components/schemas/{model}")
                components.update(body.pop("$defs", {}))
                if "model" in body.get("properties", {}):   # the names this server answers to
                    body["properties"]["model"] = {"type": "string", "enum": list(served)}
                schema["paths"][path]["post"]["requestBody"] = {
                    "required": True, "content": {"application/json": {"schema": body}}}
            app.openapi_schema = schema
        return app.openapi_schema
    return openapi


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(OpenAIError)
    async def openai_error(_: Request, e: OpenAIError) -> Response:
        return from_exception(e)

    @app.exception_handler(HTTPException)
    async def http_error(_: Request, e: HTTPException) -> Response:
        return error_response(e.status_code, str(e.detail))

    @app.exception_handler(RecursionError)
    async def nested_too_deeply(_: Request, e: RecursionError) -> Response:
        # json.loads of a body like [[[[...]]]] runs out of stack before any model sees it.
        return error_response(400, "the request body is nested too deeply to parse")

    @app.exception_handler(Exception)
    async def internal_error(_: Request, e: Exception) -> Response:
        logger.exception("unhandled error")
        return error_response(500, f"internal server error: {type(e).__name__}: {e}")


def _add_routes(app: FastAPI, state: ServerState) -> None:
    @app.get("/health")
    async def health() -> Response:
        error = state.engine.dead_error
        if error is not None:
            return JSONResponse(error_body(503, str(error)), status_code=503)
        return Response(status_code=200)

    @app.get("/version")
    async def version() -> dict[str, str]:
        return {"version": heron.__version__}

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(state.metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [
            {"id": name, "object": "model", "created": state.created, "owned_by": "heron",
             "root": state.model_path, "parent": None, "max_model_len": state.max_model_len}
            for name in state.served_model_names]}

    @app.post("/v1/completions")
    async def completions(raw: Request) -> Response:
        body = parse_body(CompletionRequest, await raw.body())
        return await serving_completion.create_completion(state, body, raw)

    @app.post("/v1/chat/completions")
    async def chat_completions(raw: Request) -> Response:
        body = parse_body(ChatCompletionRequest, await raw.body())
        return await serving_chat.create_chat_completion(state, body, raw)

    @app.post("/tokenize")
    async def tokenize(raw: Request) -> dict[str, Any]:
        body = parse_body(TokenizeRequest, await raw.body())
        state.check_model(body.model)
        if (body.prompt is None) == (body.messages is None):
            raise OpenAIError(400, "give exactly one of 'prompt' and 'messages'", "prompt")
        if body.messages is not None:
            chat = ChatCompletionRequest(messages=body.messages)
            tokens = state.render_chat(chat.conversation(), None, body.add_generation_prompt, None)
        else:
            tokens = state.encode(body.prompt or "", body.add_special_tokens)
        return {"count": len(tokens), "max_model_len": state.max_model_len, "tokens": tokens}

    @app.post("/detokenize")
    async def detokenize(raw: Request) -> dict[str, Any]:
        body = parse_body(DetokenizeRequest, await raw.body())
        state.check_model(body.model)
        vocab = len(state.tokenizer)
        bad = [t for t in body.tokens if not 0 <= t < vocab]
        if bad:
            raise OpenAIError(400, f"token id {bad[0]} is outside the vocabulary (0..{vocab - 1})",
                              "tokens")
        return {"prompt": state.tokenizer.decode(body.tokens)}


def build_state(args: argparse.Namespace) -> ServerState:
    """Load the engine for `heron serve` arguments and wrap it in a ServerState."""
    model = getattr(args, "model_tag", None) or args.model   # positional MODEL or --model
    config = EngineConfig.create(
        model=model, device=args.device, dtype=args.dtype, max_model_len=args.max_model_len,
        seed=args.seed, enable_prefix_caching=args.enable_prefix_caching,
        max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
        block_size=args.block_size, kv_cache_memory_bytes=args.kv_cache_memory_bytes,
        speculative_config=getattr(args, "speculative_config", None), **parallel_kwargs(args))
    chat_template = load_chat_template(args.chat_template)
    names = args.served_model_name or [model or DEFAULT_MODEL_NAME]
    engine = AsyncLLMEngine.from_config(
        config, max_waiting_requests=getattr(args, "max_waiting_requests", None))
    core = engine.engine
    metrics = ServerMetrics(names[0], core.max_model_len, lambda: engine.stats)
    engine.stat_logger = metrics
    return ServerState(engine=engine, tokenizer=load_tokenizer(config.model.tokenizer
                                                               or core.model_path),
                       served_model_names=list(names), max_model_len=core.max_model_len,
                       model_path=core.model_path, metrics=metrics, chat_template=chat_template,
                       api_key=args.api_key or None)


def run_server(args: argparse.Namespace) -> int:
    """Load the model, then serve until interrupted (SIGINT / SIGTERM)."""
    import uvicorn

    state = build_state(args)
    core = state.engine.engine
    logger.info("serving %s as %s: platform %s, %d KV blocks, max_model_len %d, on http://%s:%d",
                core.model_path, ", ".join(state.served_model_names), core.platform.name,
                core.num_blocks, state.max_model_len, args.host, args.port)
    cors = CorsSettings(tuple(args.allowed_origins), args.allowed_credentials,
                        tuple(args.allowed_methods), tuple(args.allowed_headers))
    app = build_app(state, args.max_request_body_bytes, cors)
    config = uvicorn.Config(app, host=args.host, port=args.port,
                            log_level=args.uvicorn_log_level,
                            access_log=not args.disable_uvicorn_access_log,
                            # open streams must not keep a stopping server alive forever
                            timeout_graceful_shutdown=5)
    uvicorn.Server(config).run()
    state.engine.shutdown()
    return 0
