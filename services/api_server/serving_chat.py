"""POST /v1/chat/completions: messages -> the tokenizer's chat template -> engine -> a
``chat.completion`` body, or ``chat.completion.chunk`` SSE events (a role chunk per choice
first, then content deltas, then the usage chunk when asked for)."""

from __future__ import annotations

from collections.abc import AsyncIterator

from starlette.requests import Request
from starlette.responses import Response
from tandem.engine.outputs import CompletionOutput, PositionLogprobs
from tandem.services.api_server.errors import bad_request
from tandem.services.api_server.protocol import ChatCompletionRequest, ChatTemplateFields
from tandem.services.api_server.responses import (
    MIN_LOGPROB,
    AssistantMessage,
    ChatChoice,
    ChatCompletionChunk,
    ChatCompletionResponse,
    ChatLogprobs,
    ChatStreamChoice,
    DeltaMessage,
    TokenLogprob,
    TopLogprob,
    Usage,
    prompt_logprobs_of,
)
from tandem.services.api_server.serving import Choice, OpenAIServing, Prompt

# Template arguments a request may not override through chat_template_kwargs.
_RESERVED_TEMPLATE_ARGS = frozenset(
    {"conversation", "tokenize", "chat_template", "add_generation_prompt", "return_dict"}
    | {"continue_final_message", "return_tensors", "padding", "truncation", "tools"}
)


class ChatServing(OpenAIServing):
    id_prefix = "chatcmpl"

    async def render(self, body: ChatTemplateFields, add_special_tokens: bool = False) -> Prompt:
        """The conversation through the tokenizer's chat template, tokenized. The template
        holds the special tokens already, so none are added again (as ``LLM.chat``)."""
        kwargs = dict(body.chat_template_kwargs or {})
        reserved = sorted(_RESERVED_TEMPLATE_ARGS & kwargs.keys())
        if reserved:
            raise bad_request(
                f"chat_template_kwargs: may not set {reserved}", "chat_template_kwargs"
            )
        messages = [m.template_dict() for m in body.messages]

        def apply(tokenizer) -> Prompt:
            try:
                text = tokenizer.apply_chat_template(
                    messages,
                    tokenize=False,
                    add_generation_prompt=body.add_generation_prompt,
                    continue_final_message=body.continue_final_message,
                    **kwargs,
                )
            except Exception as e:  # jinja2 and transformers raise several kinds
                raise bad_request(f"messages: the chat template failed: {e}", "messages") from e
            self.check_text_length(text, "messages")
            ids = tokenizer(text, add_special_tokens=add_special_tokens).input_ids
            return Prompt(text, ids)

        return await self.in_tokenizer_thread(apply)

    async def create(
        self, body: ChatCompletionRequest, raw_request: Request, request_id: str
    ) -> Response:
        self.check_request(body.model)
        self.admit(body.n)
        prompt = await self.render(body)
        max_tokens = body.max_output_tokens
        self.check_length(prompt, max_tokens, "messages")
        renames = None
        if body.max_completion_tokens is not None:
            renames = {"max_tokens": "max_completion_tokens"}
        params = self.sampling_params(body, max_tokens, body.num_logprobs, renames)
        return await self.serve(raw_request, body, [prompt], params, request_id)

    def response(
        self, body: ChatCompletionRequest, response_id: str, choices: list[Choice], usage: Usage
    ) -> ChatCompletionResponse:
        return ChatCompletionResponse(
            id=response_id,
            model=self.config.model_name,
            choices=[
                ChatChoice(
                    index=index,
                    message=AssistantMessage(content=choice.text),
                    logprobs=_logprobs(choice.token_ids, choice.logprobs, body.num_logprobs),
                    finish_reason=choice.finish_reason,
                    stop_reason=choice.stop_reason,
                )
                for index, choice in enumerate(choices)
            ],
            usage=usage,
            prompt_logprobs=prompt_logprobs_of(choices[0].prompt_logprobs if choices else None),
        )

    async def stream_choices(
        self, body: ChatCompletionRequest, deltas: AsyncIterator[tuple[int, CompletionOutput]]
    ) -> AsyncIterator[list[ChatStreamChoice]]:
        for index in range(body.n):  # OpenAI opens every choice with the role
            yield [ChatStreamChoice(index=index, delta=DeltaMessage(role="assistant", content=""))]
        async for index, delta in deltas:
            logprobs = _logprobs(delta.token_ids, delta.logprobs or [], body.num_logprobs)
            yield [
                ChatStreamChoice(
                    index=index,
                    delta=DeltaMessage(content=delta.text),
                    logprobs=logprobs,
                    finish_reason=delta.finish_reason,
                    stop_reason=delta.stop_reason,
                )
            ]

    def chunk(
        self, response_id: str, choices: list[ChatStreamChoice], usage: Usage | None = None
    ) -> ChatCompletionChunk:
        return ChatCompletionChunk(
            id=response_id, model=self.config.model_name, choices=choices, usage=usage
        )


def _logprobs(
    token_ids: list[int], positions: list[PositionLogprobs], num_top: int | None
) -> ChatLogprobs | None:
    """Chat's shape: per token its logprob and bytes, plus the ``num_top`` most likely."""
    if num_top is None:
        return None

    def entry(token: str | None, logprob: float) -> TopLogprob:
        token = token or ""
        return TopLogprob(
            token=token, logprob=max(logprob, MIN_LOGPROB), bytes=list(token.encode())
        )

    content = []
    for token_id, position in zip(token_ids, positions):
        chosen = entry(position[token_id].decoded_token, position[token_id].logprob)
        ranked = sorted(position.values(), key=lambda lp: lp.rank)[:num_top]
        top = [entry(lp.decoded_token, lp.logprob) for lp in ranked]
        content.append(TokenLogprob(**chosen.model_dump(), top_logprobs=top))
    return ChatLogprobs(content=content)
