"""The front end's input side: a user request -> checked ``EngineCoreRequest``s.

Tokenizes text prompts, checks everything the engine core would otherwise trip over
inside a step (lengths and token ids against the model, a KV handle's shape, continued
tokens and their logprobs), fans ``n > 1`` out into one core request per sample, and
builds the ``UserRequestState`` the output processor keeps. Raises ``ValueError`` naming
the field; the caller's ``SamplingParams`` are never modified.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

from tandem.engine.core import EngineCoreRequest, EngineInfo
from tandem.engine.detokenizer import IncrementalDetokenizer
from tandem.engine.output_processor import SampleState, UserRequestState
from tandem.engine.outputs import PositionLogprobs
from tandem.engine.sampling_params import RequestOutputKind, SamplingParams, check_token_ids
from tandem.kvtransfer.base import KVTransferParams
from tandem.kvtransfer.common import cdiv

PromptType = str | dict[str, Any]


def sample_id(request_id: str, index: int, n: int) -> str:
    """The engine-side id of sample ``index`` of a user request with ``n`` samples."""
    return request_id if n == 1 else f"{index}_{request_id}"


class InputProcessor:
    def __init__(self, tokenizer: Any, info: EngineInfo) -> None:
        self.tokenizer = tokenizer
        self.info = info

    def tokenize(self, prompt: PromptType) -> tuple[str | None, list[int], str | None]:
        """(prompt text, prompt token ids, cache salt) of a text or token-id prompt."""
        if isinstance(prompt, str):
            return prompt, self.tokenizer(prompt).input_ids, None
        if not isinstance(prompt, dict):
            raise TypeError(f"prompt must be a str or a dict, got {type(prompt).__name__}")
        salt = prompt.get("cache_salt")
        if "prompt_token_ids" in prompt:
            return prompt.get("prompt"), list(prompt["prompt_token_ids"]), salt
        if "prompt" in prompt:
            return prompt["prompt"], self.tokenizer(prompt["prompt"]).input_ids, salt
        raise ValueError("prompt: a dict prompt needs 'prompt' or 'prompt_token_ids'")

    def process(
        self,
        request_id: str,
        prompt: PromptType,
        params: SamplingParams | None,
        *,
        output_kind: RequestOutputKind | None = None,
        output_token_ids: list[int] | None = None,
        output_logprobs: list[PositionLogprobs] | None = None,
        kv_transfer_params: dict[str, Any] | None = None,
    ) -> tuple[UserRequestState, list[EngineCoreRequest]]:
        """``output_token_ids`` continue a request prefilled elsewhere, ``output_logprobs``
        (one position per continued token, when the request asks for logprobs) are those
        tokens' logprobs as that engine computed them; ``output_kind`` overrides the
        params' own (on a copy)."""
        text, token_ids, salt = self.tokenize(prompt)
        continued = list(output_token_ids or [])
        self._check_prompt(token_ids, continued)
        params = params or SamplingParams()
        if output_kind is not None and params.output_kind is not output_kind:
            params = dataclasses.replace(params, output_kind=output_kind)
        check_token_ids(params.stop_token_ids, self.info.runtime.vocab_size, "stop_token_ids")
        if kv_transfer_params is not None:
            self._check_kv_transfer_params(kv_transfer_params, len(token_ids))
        continued_logprobs, cumulative = _continued_logprobs(params, continued, output_logprobs)
        arrival = time.monotonic()
        samples: dict[str, SampleState] = {}
        requests: list[EngineCoreRequest] = []
        for index in range(params.n):
            engine_id = sample_id(request_id, index, params.n)
            child = params if params.n == 1 else params.child(index)
            detok = IncrementalDetokenizer(self.tokenizer, token_ids, child)
            if continued and detok.update(list(continued)) is not None:
                # The tokens made elsewhere already hit a stop string: that engine should
                # have finished the request; continuing would emit text past the stop.
                raise ValueError(
                    "output_token_ids: the continued tokens already end the request "
                    "at one of its stop strings"
                )
            samples[engine_id] = SampleState(
                index,
                detok,
                list(continued),
                None if continued_logprobs is None else list(continued_logprobs),
                cumulative,
            )
            requests.append(
                EngineCoreRequest(
                    engine_id,
                    token_ids,
                    child,
                    salt,
                    continued,
                    kv_transfer_params,
                    # siblings share sample 0's prompt KV
                    requests[0].request_id if requests else None,
                    arrival,
                )
            )
        return UserRequestState(request_id, text, token_ids, params, samples), requests

    def _check_prompt(self, token_ids: list[int], output_token_ids: list[int]) -> None:
        runtime = self.info.runtime
        if not token_ids:
            raise ValueError("prompt: the prompt is empty")
        total = len(token_ids) + len(output_token_ids)
        if total >= runtime.max_model_len:
            raise ValueError(
                f"prompt: {total} tokens leave no room to generate within "
                f"max_model_len={runtime.max_model_len}"
            )
        check_token_ids(token_ids, runtime.vocab_size, "prompt_token_ids")
        check_token_ids(output_token_ids, runtime.vocab_size, "output_token_ids")

    def _check_kv_transfer_params(self, kv_transfer_params: dict, num_prompt_tokens: int) -> None:
        """A KV handle the scheduler can act on: parsed, and covering no more than the
        prompt with enough blocks (checked here, since the scheduler trusts it)."""
        handle = KVTransferParams.from_dict(kv_transfer_params)
        if handle.num_remote_tokens > num_prompt_tokens:
            raise ValueError(
                f"kv_transfer_params: num_remote_tokens {handle.num_remote_tokens} exceeds "
                f"the prompt's {num_prompt_tokens} tokens"
            )
        needed = cdiv(handle.num_remote_tokens, self.info.block_size)
        if len(handle.remote_block_ids) < needed:
            raise ValueError(
                f"kv_transfer_params: {handle.num_remote_tokens} tokens need {needed} "
                f"remote_block_ids, {len(handle.remote_block_ids)} given"
            )


def _continued_logprobs(
    params: SamplingParams, output_token_ids: list[int], output_logprobs: Any
) -> tuple[list[PositionLogprobs] | None, float | None]:
    """(the continued tokens' logprobs, their cumulative logprob), checked against the
    tokens; (None, None) when the request asks for no logprobs or continues none. A request
    with logprobs continued without them would list fewer positions than tokens."""
    if params.logprobs is None or not output_token_ids:
        if output_logprobs:
            raise ValueError(
                "output_logprobs: given for a request that asks for no logprobs "
                "or continues no output_token_ids"
            )
        return None, None
    if output_logprobs is None or len(output_logprobs) != len(output_token_ids):
        given = "none" if output_logprobs is None else len(output_logprobs)
        raise ValueError(
            f"output_logprobs: the request asks for logprobs, so each of its "
            f"{len(output_token_ids)} output_token_ids needs a position ({given} given)"
        )
    positions: list[PositionLogprobs] = []
    cumulative = 0.0
    for i, (token, position) in enumerate(zip(output_token_ids, output_logprobs)):
        if not isinstance(position, dict) or token not in position:
            raise ValueError(f"output_logprobs: position {i} lacks its token {token}")
        positions.append(dict(position))
        cumulative += position[token].logprob  # in order, as the output processor sums
    return positions, cumulative
