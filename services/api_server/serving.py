"""What the completion and chat handlers share: the model check, tokenization off the
event loop, the context-length check, SamplingParams, and running prompts through an
``EngineClient`` (metrics recorded, engine errors turned into API errors, streams merged).

Data flow: body -> ``Prompt``s (tokenized here) -> ``generate`` -> ``(prompt index,
RequestOutput delta)`` pairs -> the handler folds them into a response or SSE chunks.
"""

from __future__ import annotations

import contextlib
import copy
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any, NamedTuple, TypeVar

from pydantic import BaseModel
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from tandem.engine.async_llm import EngineDeadError
from tandem.engine.outputs import CompletionOutput, PositionLogprobs, RequestOutput
from tandem.engine.sampling_params import RequestOutputKind, SamplingParams, check_token_ids
from tandem.services.api_server.config import ServerConfig
from tandem.services.api_server.engine_client import EngineClient, EngineUnavailableError
from tandem.services.api_server.errors import (
    APIError,
    bad_request,
    engine_dead,
    engine_unavailable,
    from_value_error,
    model_not_found,
    overloaded,
)
from tandem.services.api_server.metrics import ServerMetrics
from tandem.services.api_server.protocol import SamplingRequest
from tandem.services.api_server.responses import Usage, sse
from tandem.services.api_server.streams import merge_streams, sse_response, until_disconnect
from tandem.services.api_server.tokenizer_pool import TokenizerPool

T = TypeVar("T")
Item = tuple[int, RequestOutput]  # (prompt index, delta)


class Prompt(NamedTuple):
    text: str | None
    token_ids: list[int]


def unavailable(dead_error: BaseException) -> APIError:
    """The 503 for an engine client that cannot serve: dead, or (router) no instance up."""
    if isinstance(dead_error, EngineUnavailableError):
        return engine_unavailable(str(dead_error))
    return engine_dead()


class OpenAIServing:
    def __init__(
        self,
        engine_client: EngineClient,
        config: ServerConfig,
        metrics: ServerMetrics,
        tokenizer_pool: TokenizerPool,
    ) -> None:
        self.engine_client = engine_client
        self.config = config
        self.metrics = metrics
        self.max_model_len: int = engine_client.max_model_len
        # Tokenizing on the event loop would stall every other request: tokenizer threads,
        # each with its own copy of the (not thread-safe) HF tokenizer.
        self._tokenizer_pool = tokenizer_pool

    # -- checks ---------------------------------------------------------------------------
    def check_request(self, model: str | None) -> None:
        """503 when the engine is dead, 404 for a model this server does not serve."""
        if self.engine_client.dead_error is not None:
            raise unavailable(self.engine_client.dead_error)
        if model is not None and model not in self.config.served_model_name:
            raise model_not_found(model, self.config.served_model_name)

    def admit(self, num_sequences: int) -> None:
        """Backpressure before any work: 400 for a request that asks for more sequences
        (prompts x n) than one may, 503 with Retry-After while the engine's queue is full."""
        cap = self.config.max_sequences_per_request
        if num_sequences > cap:
            raise bad_request(
                f"n: the request asks for {num_sequences} sequences (prompts x n), more than "
                f"the {cap} one request may (--max-sequences-per-request).",
                "n",
            )
        limit = self.config.max_waiting_requests
        if limit:
            waiting = self.engine_client.get_stats().num_requests_waiting
            if waiting + num_sequences > limit:
                raise overloaded(
                    f"{waiting} sequences are waiting for the engine, and the limit is "
                    f"{limit} (--max-waiting-requests)"
                )

    def check_length(self, prompt: Prompt, max_tokens: int | None, param: str) -> None:
        """vLLM's rule: the prompt must leave room, and an explicit max_tokens must fit.
        Token ids a client gave must be this vocabulary's (checked here, before any
        instance sees them)."""
        if prompt.text is None:
            try:
                check_token_ids(prompt.token_ids, self.engine_client.vocab_size, "prompt_token_ids")
            except ValueError as e:
                raise from_value_error(e) from e
        num, limit = len(prompt.token_ids), self.max_model_len
        if num >= limit:
            raise bad_request(
                f"{param}: {num} tokens leave no room to generate within this model's "
                f"maximum context length of {limit} tokens; shorten the input.",
                param,
            )
        if max_tokens is not None and num + max_tokens > limit:
            raise bad_request(
                f"max_tokens: {max_tokens} plus {num} input tokens exceeds this model's "
                f"maximum context length of {limit} tokens; ask for at most {limit - num}.",
                "max_tokens",
            )

    def sampling_params(
        self,
        body: SamplingRequest,
        max_tokens: int | None,
        logprobs: int | None,
        renames: dict[str, str] | None = None,
    ) -> SamplingParams:
        fields: dict[str, Any] = body.sampling_fields()
        try:
            params = SamplingParams(
                **fields,
                max_tokens=max_tokens,
                logprobs=logprobs,
                output_kind=RequestOutputKind.DELTA,
            )
            check_token_ids(params.stop_token_ids, self.engine_client.vocab_size, "stop_token_ids")
        except ValueError as e:
            raise from_value_error(e, renames) from e
        return params

    # -- tokenizer ------------------------------------------------------------------------
    async def in_tokenizer_thread(self, fn: Callable[[Any], T]) -> T:
        """``fn(tokenizer)`` on a tokenizer thread."""
        return await self._tokenizer_pool.run(fn)

    def check_text_length(self, text: str, param: str) -> None:
        """Refuses, before tokenizing it, a text too long to fit in any case."""
        if len(text) >= self._tokenizer_pool.max_text_chars:
            raise bad_request(
                f"{param}: {len(text)} characters are more than this model's maximum context "
                f"length of {self.max_model_len} tokens can hold; shorten the input.",
                param,
            )

    async def tokenize(
        self, prompt: str | list[int], add_special_tokens: bool = True, param: str = "prompt"
    ) -> Prompt:
        if not isinstance(prompt, str):
            return Prompt(None, list(prompt))
        self.check_text_length(prompt, param)
        ids = await self.in_tokenizer_thread(
            lambda tokenizer: tokenizer(prompt, add_special_tokens=add_special_tokens).input_ids
        )
        return Prompt(prompt, ids)

    # -- generation -----------------------------------------------------------------------
    def generate(
        self, prompts: list[Prompt], params: SamplingParams, request_id: str, salt: str | None
    ) -> AsyncIterator[Item]:
        """Every prompt's deltas, tagged with its index; closing this aborts them all."""
        streams = []
        for index, prompt in enumerate(prompts):
            engine_id = request_id if len(prompts) == 1 else f"{request_id}-{index}"
            inputs = {"prompt": prompt.text, "prompt_token_ids": prompt.token_ids}
            if salt is not None:
                inputs["cache_salt"] = salt
            stream = self.engine_client.generate(inputs, copy.copy(params), engine_id)
            streams.append(self._checked(stream))
        return merge_streams(streams)

    async def _checked(self, stream: AsyncIterator[RequestOutput]) -> AsyncIterator[RequestOutput]:
        tracker = self.metrics.track()
        try:
            async for output in stream:
                tracker.observe(output)
                if output.metrics.get("error"):
                    message = f"The engine failed this request: {output.metrics['error']}"
                    raise APIError(500, message, type="server_error")
                yield output
        except EngineDeadError as e:
            raise engine_dead() from e
        except EngineUnavailableError as e:
            tracker.discard()
            raise engine_unavailable(str(e)) from e
        except ValueError as e:  # the engine refused the request: it never ran
            tracker.discard()
            raise from_value_error(e) from e
        finally:
            tracker.close()
            await stream.aclose()

    # -- one request, whole or streamed ---------------------------------------------------
    id_prefix = "cmpl"

    async def serve(
        self,
        raw_request: Request,
        body: SamplingRequest,
        prompts: list[Prompt],
        params: SamplingParams,
        request_id: str,
    ) -> Response:
        """Run ``prompts``; answer with ``response()``, or stream ``stream_choices()``."""
        stream = self.generate(prompts, params, request_id, body.cache_salt)
        usage = UsageCounter(prompts, self.config.enable_prompt_tokens_details)
        response_id = f"{self.id_prefix}-{request_id}"
        if not body.stream:
            choices = await until_disconnect(raw_request, collect(stream, body.n, usage))
            for index, choice in enumerate(choices):
                choice.prompt_logprobs = usage.prompt_logprobs.get(index // body.n)
            response = self.response(body, response_id, choices, usage.usage())
            return JSONResponse(response.model_dump())

        profiler = self.engine_client.profiler

        async def events(items: AsyncIterator[Item]) -> AsyncIterator[str]:
            async for choices in self.stream_choices(body, new_deltas(items, body.n, usage)):
                start = time.perf_counter()
                event = sse(self.chunk(response_id, choices))
                if profiler is not None:
                    profiler.add("http_serialization", time.perf_counter() - start)
                yield event
            if body.include_usage:
                yield sse(self.chunk(response_id, [], usage.usage()))

        return await sse_response(raw_request, stream, events)

    def response(
        self, body: Any, response_id: str, choices: list[Choice], usage: Usage
    ) -> BaseModel:
        """The whole response of a request that does not stream."""
        raise NotImplementedError

    def stream_choices(
        self, body: Any, deltas: AsyncIterator[tuple[int, CompletionOutput]]
    ) -> AsyncIterator[list[Any]]:
        """The choices of each chunk, from the (choice index, delta) pairs."""
        raise NotImplementedError

    def chunk(self, response_id: str, choices: list[Any], usage: Usage | None = None) -> BaseModel:
        """One stream chunk holding ``choices`` (none, with ``usage``, for the last)."""
        raise NotImplementedError


@dataclass
class Choice:
    """One choice of a non-streamed response, accumulated from its deltas."""

    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[PositionLogprobs] = field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    prompt_logprobs: list[PositionLogprobs | None] | None = None  # its prompt's


async def collect(stream: AsyncIterator[Item], n: int, usage: UsageCounter) -> list[Choice]:
    """Every choice, ordered by index (prompt index * n + sample index)."""
    choices: dict[int, Choice] = {}
    async for index, completion in new_deltas(stream, n, usage):
        choice = choices.setdefault(index, Choice())
        choice.text += completion.text
        choice.token_ids += completion.token_ids
        choice.logprobs += completion.logprobs or []
        choice.finish_reason = completion.finish_reason
        choice.stop_reason = completion.stop_reason
    return [choices[i] for i in sorted(choices)]


async def new_deltas(
    stream: AsyncIterator[Item], n: int, usage: UsageCounter
) -> AsyncIterator[tuple[int, CompletionOutput]]:
    """(choice index, delta) for each delta that says something new; a finished choice
    is reported once (the engine repeats finished samples while their siblings run)."""
    finished: set[int] = set()
    async with contextlib.aclosing(stream):
        async for prompt_index, output in stream:
            usage.add(prompt_index, output)
            for completion in output.outputs:
                index = prompt_index * n + completion.index
                if index in finished:
                    continue
                if completion.finish_reason is not None:
                    finished.add(index)
                elif not completion.text and not completion.token_ids:
                    continue
                yield index, completion


class UsageCounter:
    """Token counts of one user request across its prompts and samples, and each
    prompt's logprobs (which arrive in pieces while a long prompt is prefilled)."""

    def __init__(self, prompts: list[Prompt], with_details: bool = False) -> None:
        self.with_details = with_details  # report cached_tokens (--enable-prompt-tokens-details)
        self.num_prompt_tokens = sum(len(p.token_ids) for p in prompts)
        self.num_cached: dict[int, int] = {}
        self.num_completion_tokens = 0
        self.prompt_logprobs: dict[int, list[PositionLogprobs | None]] = {}

    def add(self, prompt_index: int, output: RequestOutput) -> None:
        self.num_cached[prompt_index] = output.num_cached_tokens
        self.num_completion_tokens += sum(len(c.token_ids) for c in output.outputs)
        if output.prompt_logprobs:
            self.prompt_logprobs.setdefault(prompt_index, []).extend(output.prompt_logprobs)

    def usage(self) -> Usage:
        cached = sum(self.num_cached.values()) if self.with_details else None
        return Usage.of(self.num_prompt_tokens, self.num_completion_tokens, cached)
