"""The FastAPI app: routes are thin adapters from HTTP to the serving classes.

``create_app(engine_client, config)`` wires the guard middleware (request id, body size,
API key), OpenAI-shaped error handlers, and one serving object per API family over one
``EngineClient``: the local engine (``tandem serve``) or prefill and decode instances
(``tandem router``).
"""

from __future__ import annotations

from importlib import metadata

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from tandem.engine.sampling_params import check_token_ids
from tandem.services.api_server.config import ServerConfig
from tandem.services.api_server.engine_client import EngineClient, EngineUnavailableError
from tandem.services.api_server.errors import from_value_error, install_error_handlers
from tandem.services.api_server.metrics import CONTENT_TYPE, ServerMetrics
from tandem.services.api_server.middleware import REQUEST_ID_KEY, GuardMiddleware
from tandem.services.api_server.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    TokenizeChatRequest,
    TokenizeCompletionRequest,
)
from tandem.services.api_server.responses import (
    DetokenizeResponse,
    ModelCard,
    ModelList,
    TokenizeResponse,
)
from tandem.services.api_server.serving import unavailable
from tandem.services.api_server.serving_chat import ChatServing
from tandem.services.api_server.serving_completion import CompletionServing
from tandem.services.api_server.tokenizer_pool import TokenizerPool


def _version() -> str:
    try:
        return metadata.version("tandem")
    except metadata.PackageNotFoundError:
        return "unknown"


def create_app(engine_client: EngineClient, config: ServerConfig) -> FastAPI:
    app = FastAPI(title="Tandem", version=_version(), docs_url=None, redoc_url=None)
    app.add_middleware(
        GuardMiddleware,
        api_key=config.api_key,
        max_body_bytes=config.max_request_body_bytes,
        max_header_bytes=config.h11_max_incomplete_event_size,
        body_timeout=config.body_read_timeout,
        max_concurrent_requests=config.max_concurrent_requests,
    )
    install_error_handlers(app)
    metrics = ServerMetrics(
        config.model_name,
        engine_client.get_stats,
        lambda: (
            engine_client.dead_error is not None
            and not isinstance(engine_client.dead_error, EngineUnavailableError)
        ),
    )
    pool = TokenizerPool(
        engine_client.tokenizer, config.tokenizer_threads, engine_client.max_model_len
    )
    completions = CompletionServing(engine_client, config, metrics, pool)
    chat = ChatServing(engine_client, config, metrics, pool)
    max_model_len = engine_client.max_model_len
    vocab_size = engine_client.vocab_size

    @app.get("/health")
    async def health() -> Response:
        if engine_client.dead_error is not None:
            return unavailable(engine_client.dead_error).response()
        return Response(status_code=200)

    @app.get("/metrics")
    async def prometheus_metrics() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    if engine_client.profiler is not None:  # TANDEM_PROFILE is set: vLLM's profiling routes

        @app.post("/start_profile")
        async def start_profile() -> Response:
            await engine_client.start_profile()
            return Response(status_code=200)

        @app.post("/stop_profile")
        async def stop_profile() -> JSONResponse:
            return JSONResponse(await engine_client.stop_profile())

    @app.get("/version")
    async def version() -> JSONResponse:
        return JSONResponse({"version": _version()})

    @app.get("/v1/models")
    async def models() -> JSONResponse:
        cards = [
            ModelCard(id=name, root=config.model_path or name, max_model_len=max_model_len)
            for name in config.served_model_name
        ]
        return JSONResponse(ModelList(data=cards).model_dump())

    @app.post("/v1/completions")
    async def create_completion(body: CompletionRequest, raw_request: Request) -> Response:
        return await completions.create(body, raw_request, raw_request.scope[REQUEST_ID_KEY])

    @app.post("/v1/chat/completions")
    async def create_chat_completion(body: ChatCompletionRequest, raw_request: Request) -> Response:
        return await chat.create(body, raw_request, raw_request.scope[REQUEST_ID_KEY])

    @app.post("/tokenize")
    async def tokenize(body: TokenizeCompletionRequest | TokenizeChatRequest) -> JSONResponse:
        chat.check_request(body.model)
        if isinstance(body, TokenizeChatRequest):
            prompt = await chat.render(body, body.add_special_tokens)
        else:
            prompt = await chat.tokenize(body.prompt, body.add_special_tokens)
        strs = None
        if body.return_token_strs:
            strs = await chat.in_tokenizer_thread(
                lambda tokenizer: tokenizer.convert_ids_to_tokens(prompt.token_ids)
            )
        response = TokenizeResponse(
            count=len(prompt.token_ids),
            max_model_len=max_model_len,
            tokens=prompt.token_ids,
            token_strs=strs,
        )
        return JSONResponse(response.model_dump())

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest) -> JSONResponse:
        chat.check_request(body.model)
        try:
            check_token_ids(body.tokens, vocab_size, "tokens")
        except ValueError as e:
            raise from_value_error(e) from e
        text = await chat.in_tokenizer_thread(lambda tokenizer: tokenizer.decode(body.tokens))
        return JSONResponse(DetokenizeResponse(prompt=text).model_dump())

    return app
