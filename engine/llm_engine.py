"""The offline engine: requests in, one step at a time, RequestOutputs out.

An ``InputProcessor`` (tokenize, check, fan out) in front of an ``EngineCore`` in this
thread, an ``OutputProcessor`` (detokenize, stop strings, fan in) behind it. ``step()`` is
the whole loop: the core's step, then its news turned into outputs. ``AsyncLLM`` puts the
same three pieces around a core in its own process.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import Any

from tandem.engine.config import EngineConfig
from tandem.engine.core import EngineCore, EngineStats
from tandem.engine.kv_events import KVCacheEvent
from tandem.engine.model_loader import resolve_model_path
from tandem.engine.output_processor import OutputProcessor
from tandem.engine.outputs import PositionLogprobs, RequestOutput
from tandem.engine.processor import InputProcessor, PromptType
from tandem.engine.request import RequestStatus
from tandem.engine.sampling_params import SamplingParams
from tandem.engine.tokenizer import load_tokenizer

__all__ = ["EngineStats", "LLMEngine", "PromptType"]


class LLMEngine:
    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.model_dir = resolve_model_path(config.model.model)
        self.tokenizer = load_tokenizer(config.model.tokenizer or self.model_dir)
        self.core = EngineCore(config, str(self.model_dir))
        self.info = self.core.info
        self.input_processor = InputProcessor(self.tokenizer, self.info)
        self.output_processor = OutputProcessor(self.tokenizer)
        self.kv_event_subscribers: list[Callable[[list[KVCacheEvent]], None]] = []
        self._ids = itertools.count()

    # The core's parts, for tests and tools that look inside an offline engine.
    @property
    def scheduler(self):
        return self.core.scheduler

    @property
    def runner(self):
        return self.core.runner

    @property
    def runtime(self):
        return self.core.runtime

    @property
    def engine_id(self) -> str:
        return self.core.engine_id

    @property
    def timing(self):
        return self.core.timing

    # -- requests -------------------------------------------------------------------------
    def tokenize(self, prompt: PromptType) -> tuple[str | None, list[int], str | None]:
        """(prompt text, prompt token ids, cache salt) of a text or token-id prompt."""
        return self.input_processor.tokenize(prompt)

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
        """Queue a request (see ``InputProcessor.process`` for the continued tokens)."""
        request_id = request_id if request_id is not None else str(next(self._ids))
        if request_id in self.output_processor.requests:
            raise ValueError(f"request_id {request_id!r} is already in use")
        state, requests = self.input_processor.process(
            request_id,
            prompt,
            params,
            output_token_ids=output_token_ids,
            output_logprobs=output_logprobs,
            kv_transfer_params=kv_transfer_params,
        )
        for request in requests:  # before the output side: a refused id changes nothing
            if self.scheduler.knows(request.request_id):
                raise ValueError(f"request_id {request.request_id!r} is already in use")
        self.output_processor.add_request(state)
        for request in requests:
            self.core.add_request(request)
        return request_id

    def abort_request(self, request_id: str) -> RequestOutput | None:
        ids = self.output_processor.engine_ids(request_id) or [request_id]
        self.core.abort_requests(ids)
        return self.output_processor.abort(request_id)

    def has_unfinished_requests(self) -> bool:
        return self.core.has_unfinished_requests()

    # -- the loop -------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        outputs, stopped = self.output_processor.process(self.core.step())
        self.core.abort_requests(stopped, RequestStatus.FINISHED_STOPPED)
        self._publish_kv_events()
        return outputs

    # -- observability --------------------------------------------------------------------
    def subscribe_kv_events(self, callback: Callable[[list[KVCacheEvent]], None]) -> None:
        self.core.enable_kv_events()
        self.kv_event_subscribers.append(callback)

    def _publish_kv_events(self) -> None:
        if self.kv_event_subscribers:
            events = self.core.take_kv_events()
            if events:
                for callback in self.kv_event_subscribers:
                    callback(events)

    def get_stats(self) -> EngineStats:
        return self.core.stats()
