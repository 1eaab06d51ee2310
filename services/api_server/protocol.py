"""Request bodies: OpenAI's fields plus vLLM's sampling extras, checked by pydantic.

Unknown fields are ignored with a warning, as vLLM does, so clients that send newer
OpenAI fields keep working. A few known fields whose silent omission would change the
answer (``echo``, ``logit_bias``, ``tools``, ``response_format`` ...) are refused with a
400 instead when they ask for something this server does not do.
"""

from __future__ import annotations

import logging
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from tandem.engine import envs

logger = logging.getLogger("tandem.api_server")

# A cache salt keys the prefix cache, nothing more: a long one only costs hashing.
MAX_CACHE_SALT_CHARS = 256

# field -> values that ask for nothing (and so may be ignored)
_REFUSED_UNLESS = {
    "echo": (False,),
    "suffix": (None, ""),
    "best_of": (None, 1),
    "logit_bias": (None, {}),
    "tools": (None, []),
    "tool_choice": (None, "none"),
    "functions": (None, []),
    "function_call": (None, "none"),
    "response_format": (None, {"type": "text"}),
    "guided_json": (None,),
    "guided_regex": (None,),
    "guided_choice": (None,),
    "guided_grammar": (None,),
    "structured_outputs": (None,),
    "prompt_embeds": (None,),
}


# Chat roles OpenAI's API knows; a message with another role is a client mistake.
CHAT_ROLES = ("system", "developer", "user", "assistant", "tool", "function")


def _check_unicode(data: Any) -> None:
    """Every string in a parsed JSON body is valid Unicode. JSON lets a body spell lone
    surrogates (``"\\ud800"``), which Python keeps in a ``str`` that no tokenizer or
    encoder accepts later; refused here instead. Iterative: nesting depth costs no stack."""
    stack: list[tuple[str, Any]] = [("", data)]
    while stack:
        path, value = stack.pop()
        if isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError as e:
                where = path or "body"
                raise ValueError(f"{where}: not valid Unicode (a lone surrogate)") from e
        elif isinstance(value, dict):
            for key, item in value.items():
                stack.append((f"{path}.{key}" if path else str(key), key))
                stack.append((f"{path}.{key}" if path else str(key), item))
        elif isinstance(value, list):
            stack.extend((f"{path}.{i}", item) for i, item in enumerate(value))


class OpenAIBaseModel(BaseModel):
    # allow_inf_nan: JSON parsers here accept Infinity and NaN (and 1e400 parses as inf);
    # no float field of the API takes them.
    model_config = ConfigDict(extra="allow", allow_inf_nan=False)

    @model_validator(mode="after")
    def _check_extras(self) -> OpenAIBaseModel:
        extras = self.model_extra or {}
        for name, value in extras.items():
            if name in _REFUSED_UNLESS and value not in _REFUSED_UNLESS[name]:
                raise ValueError(f"{name} is not supported by this server; leave it out")
        ignored = sorted(name for name in extras if name not in _REFUSED_UNLESS)
        if ignored:
            logger.warning("ignoring unknown request fields: %s", ignored)
        return self


class RequestBody(OpenAIBaseModel):
    """A whole request body (not a part of one): its strings are checked once here."""

    @model_validator(mode="before")
    @classmethod
    def _valid_unicode(cls, data: Any) -> Any:
        _check_unicode(data)
        return data


class StreamOptions(OpenAIBaseModel):
    include_usage: bool = False


class SamplingRequest(RequestBody):
    """The fields completions and chat share."""

    model: str | None = None
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    user: str | None = None  # accepted for compatibility; not used
    # vLLM's extras
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    ignore_eos: bool = False
    min_tokens: int = 0
    stop_token_ids: list[int] | None = None
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    # vLLM's: the logprobs of every prompt token (the first has none) and this many top.
    prompt_logprobs: int | None = None
    cache_salt: str | None = Field(None, min_length=1, max_length=MAX_CACHE_SALT_CHARS)

    @model_validator(mode="after")
    def _stream_options_need_stream(self) -> SamplingRequest:
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed with stream=true")
        if self.prompt_logprobs is not None:
            if self.stream:  # as vLLM: a stream has no place for them
                raise ValueError("prompt_logprobs: not available with stream=true")
            if not 0 <= self.prompt_logprobs <= envs.max_logprobs():
                raise ValueError(
                    f"prompt_logprobs: must be in [0, {envs.max_logprobs()}] "
                    "(-1, the whole vocabulary, is not offered)"
                )
        return self

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def sampling_fields(self) -> dict[str, Any]:
        """The SamplingParams keyword arguments this body sets (None: the default)."""
        names = (
            "n",
            "stop",
            "seed",
            "temperature",
            "top_p",
            "presence_penalty",
            "frequency_penalty",
            "top_k",
            "min_p",
            "repetition_penalty",
            "ignore_eos",
            "min_tokens",
            "stop_token_ids",
            "skip_special_tokens",
            "spaces_between_special_tokens",
            "include_stop_str_in_output",
            "prompt_logprobs",
        )
        return {name: getattr(self, name) for name in names if getattr(self, name) is not None}


def _is_ids(value: Any) -> bool:
    return isinstance(value, list) and all(type(t) is int for t in value)


class CompletionRequest(SamplingRequest):
    # str | list[str] | list[int] | list[list[int]], checked below for one clear message
    prompt: Any
    max_tokens: int | None = 16
    logprobs: int | None = None

    @field_validator("prompt")
    @classmethod
    def _check_prompt(cls, prompt: Any) -> Any:
        if isinstance(prompt, str) or _is_ids(prompt):
            return prompt
        if isinstance(prompt, list) and (
            all(isinstance(p, str) for p in prompt) or all(_is_ids(p) for p in prompt)
        ):
            return prompt
        raise ValueError(
            "must be a string, a list of strings, a list of token ids or a list of such lists"
        )

    def prompts(self) -> list[str | list[int]]:
        """The prompts as a list: each text, or token ids."""
        prompt = self.prompt
        if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)):
            return [prompt]
        return list(prompt)


class TextPart(OpenAIBaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    # Extra keys (tool_calls, tool_call_id ...) go to the chat template as they are.
    model_config = ConfigDict(extra="allow")

    role: str
    content: str | list[TextPart] | None = None
    name: str | None = None

    @field_validator("role")
    @classmethod
    def _known_role(cls, role: str) -> str:
        if role not in CHAT_ROLES:
            raise ValueError(f"must be one of {list(CHAT_ROLES)}, got {role!r}")
        return role

    def template_dict(self) -> dict[str, Any]:
        """The message as the chat template sees it; text parts are joined."""
        content = self.content
        if isinstance(content, list):
            content = "\n".join(part.text for part in content)
        message = {**(self.model_extra or {}), "role": self.role, "content": content or ""}
        if self.name is not None:
            message["name"] = self.name
        return message


class ChatTemplateFields(RequestBody):
    messages: list[ChatMessage] = Field(min_length=1)
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template_kwargs: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _one_ending(self) -> ChatTemplateFields:
        if self.add_generation_prompt and self.continue_final_message:
            raise ValueError(
                "continue_final_message: cannot be combined with add_generation_prompt=true"
            )
        return self


class ChatCompletionRequest(SamplingRequest, ChatTemplateFields):
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None

    @model_validator(mode="after")
    def _check_logprobs(self) -> ChatCompletionRequest:
        if self.top_logprobs is None:
            return self
        if not self.logprobs:
            raise ValueError("top_logprobs: needs logprobs=true")
        if not 0 <= self.top_logprobs <= envs.max_logprobs():
            raise ValueError(f"top_logprobs: must be in [0, {envs.max_logprobs()}]")
        return self

    @property
    def num_logprobs(self) -> int | None:
        """SamplingParams.logprobs: top_logprobs when logprobs is on, else None."""
        return (self.top_logprobs or 0) if self.logprobs else None

    @property
    def max_output_tokens(self) -> int | None:
        if self.max_completion_tokens is not None:
            return self.max_completion_tokens
        return self.max_tokens


class TokenizeCompletionRequest(RequestBody):
    model: str | None = None
    prompt: str
    add_special_tokens: bool = True
    return_token_strs: bool = False


class TokenizeChatRequest(ChatTemplateFields):
    model: str | None = None
    add_special_tokens: bool = False
    return_token_strs: bool = False


class DetokenizeRequest(RequestBody):
    model: str | None = None
    tokens: list[int]
