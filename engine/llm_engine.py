"""The engine: requests in, one step at a time, RequestOutputs out.

``step()`` is the whole loop: schedule, execute, update from the output.
"""

from __future__ import annotations

import itertools
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from tandem.engine.config import EngineConfig, EngineRuntime, resolve_device
from tandem.engine.detokenizer import IncrementalDetokenizer
from tandem.engine.kv_events import KVCacheEvent
from tandem.engine.model_loader import load_hf_config, resolve_model_path
from tandem.engine.model_runner import ModelRunner
from tandem.engine.output_processor import OutputProcessor, SampleState, UserRequestState
from tandem.engine.outputs import PositionLogprobs, RequestOutput
from tandem.engine.request import Request, RequestStatus
from tandem.engine.sampling_params import SamplingParams, check_token_ids
from tandem.engine.scheduler import Scheduler
from tandem.engine.tokenizer import eos_token_ids, load_tokenizer
from tandem.kvtransfer import KVTransferParams, create_connector
from tandem.kvtransfer.common import cdiv

PromptType = str | dict[str, Any]


@dataclass
class EngineStats:
    num_requests_running: int
    num_requests_waiting: int
    kv_cache_usage_perc: float
    prefix_cache_queries: int
    prefix_cache_hits: int
    num_preemptions: int


@dataclass
class StepTiming:
    """Seconds spent in steps, and the part of it inside the model forward."""

    num_steps: int = 0
    step_seconds: float = 0.0
    forward_seconds: float = 0.0


class LLMEngine:
    def __init__(self, config: EngineConfig) -> None:
        torch.manual_seed(config.model.seed)
        self.config = config
        device = resolve_device(config.model.device)  # first: a missing GPU fails fast
        self.model_dir = resolve_model_path(config.model.model)
        hf_config = load_hf_config(self.model_dir)
        self.tokenizer = load_tokenizer(config.model.tokenizer or self.model_dir)
        self.engine_id = config.transfer.engine_id or uuid.uuid4().hex[:12]
        connector_sched = connector_worker = None
        if config.transfer.kv_connector:
            connector_sched, connector_worker = create_connector(
                config.transfer.kv_connector,
                self.engine_id,
                config.scheduler.role,
                config.cache.block_size,
                config.transfer,
                model_name=self.model_dir.name,
            )
        self.runner = ModelRunner(config, self.model_dir, hf_config, connector_worker, device)
        capacity = self.runner.num_kv_blocks * config.cache.block_size
        max_len = config.model.max_model_len or hf_config.max_position_embeddings
        # A model the engine computes exactly only up to some length (a sliding window the
        # attention backends lack) sets max_model_len_limit; the model logs the cap.
        max_len = min(max_len, getattr(self.runner.model, "max_model_len_limit", None) or max_len)
        self.runtime = EngineRuntime(
            num_kv_blocks=self.runner.num_kv_blocks,
            max_model_len=min(max_len, capacity),  # a longer request could never fit
            eos_token_ids=eos_token_ids(self.tokenizer, self.model_dir),
            vocab_size=hf_config.vocab_size,
            device=device,
        )
        self.runner.eos_token_ids = self.runtime.eos_token_ids
        self.scheduler = Scheduler(config, self.runtime, connector_sched)
        self.output_processor = OutputProcessor(self.tokenizer)
        self.kv_event_subscribers: list[Callable[[list[KVCacheEvent]], None]] = []
        self.timing = StepTiming()
        self._ids = itertools.count()

    # -- requests -------------------------------------------------------------------------
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

    def add_request(
        self,
        request_id: str | None,
        prompt: PromptType,
        params: SamplingParams | None = None,
        *,
        output_token_ids: list[int] | None = None,
        output_logprobs: list[PositionLogprobs] | None = None,
        kv_transfer_params: dict[str, Any] | None = None,
    ) -> str:
        """Queue a request; ``output_token_ids`` continues one prefilled elsewhere, and
        ``output_logprobs`` (one position per continued token, when the request asks for
        logprobs) are those tokens' logprobs as that engine computed them."""
        request_id = request_id if request_id is not None else str(next(self._ids))
        if request_id in self.output_processor.requests:
            raise ValueError(f"request_id {request_id!r} is already in use")
        text, token_ids, salt = self.tokenize(prompt)
        self._check_prompt(token_ids, output_token_ids or [])
        params = params or SamplingParams()
        check_token_ids(params.stop_token_ids, self.runtime.vocab_size, "stop_token_ids")
        if kv_transfer_params is not None:
            self._check_kv_transfer_params(kv_transfer_params, len(token_ids))
        continued_logprobs, cumulative = _continued_logprobs(
            params, output_token_ids or [], output_logprobs
        )
        params.all_stop_token_ids = set(params.stop_token_ids or [])
        samples: dict[str, SampleState] = {}
        requests: list[Request] = []
        for index in range(params.n):
            engine_id = request_id if params.n == 1 else f"{index}_{request_id}"
            child = params if params.n == 1 else params.child(index)
            owner = requests[0] if requests else None  # siblings share sample 0's prompt KV
            requests.append(
                Request(
                    engine_id,
                    token_ids,
                    child,
                    max_model_len=self.runtime.max_model_len,
                    block_size=self.config.cache.block_size,
                    cache_salt=salt,
                    output_token_ids=output_token_ids,
                    kv_transfer_params=kv_transfer_params,
                    prompt_owner=owner,
                )
            )
            detok = IncrementalDetokenizer(self.tokenizer, token_ids, child)
            if output_token_ids and detok.update(list(output_token_ids)) is not None:
                # The tokens made elsewhere already hit a stop string: that engine should
                # have finished the request; continuing would emit text past the stop.
                raise ValueError(
                    "output_token_ids: the continued tokens already end the request "
                    "at one of its stop strings"
                )
            samples[engine_id] = SampleState(
                index,
                detok,
                list(output_token_ids or []),
                None if continued_logprobs is None else list(continued_logprobs),
                cumulative,
            )
        self.output_processor.add_request(
            UserRequestState(request_id, text, token_ids, params, samples)
        )
        for request in requests:
            self.scheduler.add_request(request)
        return request_id

    def _check_prompt(self, token_ids: list[int], output_token_ids: list[int]) -> None:
        if not token_ids:
            raise ValueError("prompt: the prompt is empty")
        total = len(token_ids) + len(output_token_ids)
        if total >= self.runtime.max_model_len:
            raise ValueError(
                f"prompt: {total} tokens leave no room to generate within "
                f"max_model_len={self.runtime.max_model_len}"
            )
        check_token_ids(token_ids, self.runtime.vocab_size, "prompt_token_ids")
        check_token_ids(output_token_ids, self.runtime.vocab_size, "output_token_ids")

    def _check_kv_transfer_params(self, kv_transfer_params: dict, num_prompt_tokens: int) -> None:
        """A KV handle the scheduler can act on: parsed, and covering no more than the
        prompt with enough blocks (checked here, since the scheduler trusts it)."""
        handle = KVTransferParams.from_dict(kv_transfer_params)
        if handle.num_remote_tokens > num_prompt_tokens:
            raise ValueError(
                f"kv_transfer_params: num_remote_tokens {handle.num_remote_tokens} exceeds "
                f"the prompt's {num_prompt_tokens} tokens"
            )
        needed = cdiv(handle.num_remote_tokens, self.config.cache.block_size)
        if len(handle.remote_block_ids) < needed:
            raise ValueError(
                f"kv_transfer_params: {handle.num_remote_tokens} tokens need {needed} "
                f"remote_block_ids, {len(handle.remote_block_ids)} given"
            )

    def abort_request(self, request_id: str) -> RequestOutput | None:
        ids = self.output_processor.engine_ids(request_id) or [request_id]
        self.scheduler.finish_requests(ids, RequestStatus.FINISHED_ABORTED)
        return self.output_processor.abort(request_id)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished_requests()

    # -- the loop -------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        start = time.perf_counter()
        scheduler_output = self.scheduler.schedule()
        model_output = self.runner.execute(scheduler_output)
        core_outputs = self.scheduler.update_from_output(scheduler_output, model_output)
        outputs, stopped = self.output_processor.process(core_outputs)
        self.scheduler.finish_requests(stopped, RequestStatus.FINISHED_STOPPED)
        self._publish_kv_events()
        self.timing.num_steps += 1
        self.timing.step_seconds += time.perf_counter() - start
        self.timing.forward_seconds += self.runner.last_forward_seconds
        return outputs

    # -- observability --------------------------------------------------------------------
    def subscribe_kv_events(self, callback: Callable[[list[KVCacheEvent]], None]) -> None:
        self.scheduler.kv.pool.emit_events = True
        self.kv_event_subscribers.append(callback)

    def _publish_kv_events(self) -> None:
        if self.kv_event_subscribers:
            events = self.scheduler.kv.pool.take_events()
            if events:
                for callback in self.kv_event_subscribers:
                    callback(events)

    def get_stats(self) -> EngineStats:
        s = self.scheduler
        return EngineStats(
            num_requests_running=len(s.running),
            num_requests_waiting=len(s.waiting) + len(s.waiting_for_remote),
            kv_cache_usage_perc=s.kv.usage(),
            prefix_cache_queries=s.kv.stats.num_queries,
            prefix_cache_hits=s.kv.stats.num_hits,
            num_preemptions=s.num_preemptions,
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
