"""POST /v1/completions: one prompt or a list (text or token ids) -> engine -> a
``text_completion`` body, or SSE chunks of the same shape. Choice ``i * n + j`` is sample
``j`` of prompt ``i``, as in vLLM."""

from __future__ import annotations

from collections.abc import AsyncIterator

from starlette.requests import Request
from starlette.responses import Response
from tandem.engine.outputs import CompletionOutput, PositionLogprobs
from tandem.services.api_server.errors import bad_request
from tandem.services.api_server.protocol import CompletionRequest
from tandem.services.api_server.responses import (
    MIN_LOGPROB,
    CompletionChoice,
    CompletionLogprobs,
    CompletionResponse,
    Usage,
    prompt_logprobs_of,
)
from tandem.services.api_server.serving import Choice, OpenAIServing


class CompletionServing(OpenAIServing):
    id_prefix = "cmpl"

    async def create(
        self, body: CompletionRequest, raw_request: Request, request_id: str
    ) -> Response:
        self.check_request(body.model)
        texts_or_ids = body.prompts()
        if not texts_or_ids:
            raise bad_request("prompt: give at least one prompt", "prompt")
        self.admit(len(texts_or_ids) * body.n)
        prompts = [await self.tokenize(p) for p in texts_or_ids]
        for prompt in prompts:
            self.check_length(prompt, body.max_tokens, "prompt")
        params = self.sampling_params(body, body.max_tokens, body.logprobs)
        return await self.serve(raw_request, body, prompts, params, request_id)

    def response(
        self, body: CompletionRequest, response_id: str, choices: list[Choice], usage: Usage
    ) -> CompletionResponse:
        with_logprobs = body.logprobs is not None
        return CompletionResponse(
            id=response_id,
            model=self.config.model_name,
            choices=[
                CompletionChoice(
                    index=index,
                    text=choice.text,
                    logprobs=_logprobs(choice.token_ids, choice.logprobs, 0)
                    if with_logprobs
                    else None,
                    finish_reason=choice.finish_reason,
                    stop_reason=choice.stop_reason,
                    prompt_logprobs=prompt_logprobs_of(choice.prompt_logprobs),
                )
                for index, choice in enumerate(choices)
            ],
            usage=usage,
        )

    async def stream_choices(
        self, body: CompletionRequest, deltas: AsyncIterator[tuple[int, CompletionOutput]]
    ) -> AsyncIterator[list[CompletionChoice]]:
        text_offsets: dict[int, int] = {}
        async for index, delta in deltas:
            logprobs = None
            if body.logprobs is not None:
                offset = text_offsets.get(index, 0)
                logprobs = _logprobs(delta.token_ids, delta.logprobs or [], offset)
                text_offsets[index] = offset + sum(len(t) for t in logprobs.tokens)
            yield [
                CompletionChoice(
                    index=index,
                    text=delta.text,
                    logprobs=logprobs,
                    finish_reason=delta.finish_reason,
                    stop_reason=delta.stop_reason,
                )
            ]

    def chunk(
        self, response_id: str, choices: list[CompletionChoice], usage: Usage | None = None
    ) -> CompletionResponse:
        return CompletionResponse(
            id=response_id, model=self.config.model_name, choices=choices, usage=usage
        )


def _logprobs(
    token_ids: list[int], positions: list[PositionLogprobs], offset: int
) -> CompletionLogprobs:
    """The legacy completions shape: parallel lists, top_logprobs as {token: logprob}
    (the sampled token plus the top ``logprobs``, as vLLM reports them)."""
    result = CompletionLogprobs()
    for token_id, position in zip(token_ids, positions):
        chosen = position[token_id]
        token = chosen.decoded_token or ""
        result.tokens.append(token)
        result.token_logprobs.append(max(chosen.logprob, MIN_LOGPROB))
        result.top_logprobs.append(
            {(lp.decoded_token or ""): max(lp.logprob, MIN_LOGPROB) for lp in position.values()}
        )
        result.text_offset.append(offset)
        offset += len(token)
    return result
