"""The async engine API for services: submit a request, iterate over its output deltas.

The step loop runs in its own thread, so neither HTTP/gRPC handling nor tokenization
stalls it, and a busy step loop never blocks the event loop. Requests and aborts cross
into that thread through a queue; outputs come back with ``call_soon_threadsafe``.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import AsyncIterator
from typing import Any

from tandem.engine.config import EngineConfig
from tandem.engine.llm_engine import LLMEngine, PromptType
from tandem.engine.outputs import RequestOutput
from tandem.engine.sampling_params import RequestOutputKind, SamplingParams

logger = logging.getLogger(__name__)


class EngineDeadError(RuntimeError):
    """The step loop died; every request in flight fails with this."""


class AsyncLLM:
    def __init__(self, config: EngineConfig) -> None:
        self.engine = LLMEngine(config)
        self._inbox: queue.Queue = queue.Queue()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._wakeup = threading.Event()
        self._stopped = False
        self.dead_error: BaseException | None = None
        self._thread = threading.Thread(target=self._loop, name="tandem-engine", daemon=True)
        self._thread.start()

    @classmethod
    def from_options(cls, model: str | None = None, **options: Any) -> AsyncLLM:
        return cls(EngineConfig.from_options(model=model, **options))

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    async def generate(
        self,
        prompt: PromptType,
        params: SamplingParams,
        request_id: str,
        **request_kwargs: Any,
    ) -> AsyncIterator[RequestOutput]:
        """Yield deltas of request ``request_id``; leaving the loop early aborts it."""
        if self.dead_error is not None:
            raise EngineDeadError("the engine has died") from self.dead_error
        if request_id in self._streams:  # checked here: a second stream would steal the first's
            raise ValueError(f"request_id {request_id!r} is already in use")
        if params.output_kind is RequestOutputKind.CUMULATIVE:
            params.output_kind = RequestOutputKind.DELTA
        # Tokenize here, off the step loop; the engine thread only queues the ids.
        text, token_ids, salt = self.engine.tokenize(prompt)
        prepared = {"prompt": text, "prompt_token_ids": token_ids, "cache_salt": salt}
        stream: asyncio.Queue = asyncio.Queue()
        self._streams[request_id] = (asyncio.get_running_loop(), stream)
        done = asyncio.get_running_loop().create_future()
        self._submit(("add", request_id, prepared, params, request_kwargs, done))
        try:
            await done  # raises the engine's ValueError for bad input
            while True:
                item = await stream.get()
                if isinstance(item, BaseException):
                    raise EngineDeadError("the engine has died") from item
                yield item
                if item.finished:
                    # Done: nothing to abort. (An abort now would free the blocks a
                    # prefill engine leases for the decode side.)
                    self._streams.pop(request_id, None)
                    return
        finally:
            if self._streams.pop(request_id, None) is not None:
                self._submit(("abort", request_id))

    async def abort(self, request_id: str) -> None:
        self._submit(("abort", request_id))

    def shutdown(self) -> None:
        self._stopped = True
        self._wakeup.set()
        self._thread.join(timeout=10)

    def _submit(self, item: tuple) -> None:
        self._inbox.put(item)
        self._wakeup.set()

    # -- the engine thread ----------------------------------------------------------------
    def _loop(self) -> None:
        try:
            while not self._stopped:
                self._drain_inbox()
                if not self.engine.scheduler.has_work():
                    self._wakeup.wait(timeout=0.5)
                    self._wakeup.clear()
                    continue
                for output in self.engine.step():
                    self._deliver(output.request_id, output)
                scheduler = self.engine.scheduler
                if not scheduler.running and not scheduler.waiting:
                    # Only leases or KV loads in flight: poll for them, do not spin a core.
                    self._wakeup.wait(timeout=0.002)
                    self._wakeup.clear()
        except BaseException as e:  # noqa: BLE001 - every waiter must hear about it
            logger.exception("the engine died; every request in flight fails")
            self.dead_error = e
            for rid in list(self._streams):
                self._deliver(rid, e)

    def _drain_inbox(self) -> None:
        while True:
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                return
            if item[0] == "abort":
                self.engine.abort_request(item[1])
                continue
            _, rid, prompt, params, kwargs, done = item
            loop = done.get_loop()
            try:
                self.engine.add_request(rid, prompt, params, **kwargs)
            except Exception as e:  # bad input: the caller gets the exception
                loop.call_soon_threadsafe(_set_exception, done, e)
            else:
                loop.call_soon_threadsafe(_set_result, done)

    def _deliver(self, request_id: str, item: Any) -> None:
        target = self._streams.get(request_id)
        if target is not None:
            loop, stream = target
            loop.call_soon_threadsafe(stream.put_nowait, item)


def _set_result(future: asyncio.Future) -> None:
    if not future.done():
        future.set_result(None)


def _set_exception(future: asyncio.Future, error: Exception) -> None:
    if not future.done():
        future.set_exception(error)
