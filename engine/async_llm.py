"""The async engine API for services: submit a request, iterate over its output deltas.

The engine core runs in its own process (``core_client.MPClient``; in a thread only for
the in-process loopback KV connector), so the event loop's HTTP or gRPC work never shares
its GIL. This side tokenizes and checks requests (``InputProcessor``), sends them as typed
messages, and turns each step's batch of token news into per-request deltas
(``OutputProcessor``: detokenization, stop strings) on the event loop. A request's deltas
that arrive while its consumer is busy are merged, so a slow stream costs one message,
not one per token. A core that dies fails every request in flight at once.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
import time
from collections.abc import AsyncIterator
from typing import Any

from tandem.engine import envs
from tandem.engine.config import EngineConfig
from tandem.engine.core import EngineInfo, EngineStats
from tandem.engine.core_client import EngineCoreClient, InprocClient, MPClient, core_config
from tandem.engine.core_messages import (
    AbortRequests,
    AddRequest,
    CoreOutput,
    Failed,
    Outputs,
    UtilityCall,
)
from tandem.engine.model_loader import resolve_model_path
from tandem.engine.output_processor import OutputProcessor
from tandem.engine.outputs import RequestOutput
from tandem.engine.processor import InputProcessor, PromptType
from tandem.engine.profiling import StepProfiler
from tandem.engine.sampling_params import RequestOutputKind, SamplingParams
from tandem.engine.tokenizer import load_tokenizer
from tandem.kvtransfer.base import TransferRecord

logger = logging.getLogger(__name__)


class EngineDeadError(RuntimeError):
    """The engine core died; every request in flight fails with this."""


class AsyncLLM:
    def __init__(self, config: EngineConfig, multiprocess: bool | None = None) -> None:
        """``multiprocess`` None: a process unless the KV connector is the in-process
        loopback (or TANDEM_ENGINE_MULTIPROCESS=0)."""
        model_dir = resolve_model_path(config.model.model)
        self.tokenizer = load_tokenizer(config.model.tokenizer or model_dir)
        if multiprocess is None:
            multiprocess = config.transfer.kv_connector != "loopback" and envs.engine_multiprocess()
        self.dead_error: BaseException | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._collectors: dict[str, _Collector] = {}
        self._records: list[TransferRecord] = []
        self._records_lock = threading.Lock()
        self._calls: dict[int, asyncio.Future] = {}
        self._call_ids = itertools.count()
        self.stats = EngineStats()
        client_cls = MPClient if multiprocess else InprocClient
        self.client: EngineCoreClient = client_cls(
            core_config(config, str(model_dir)), self._on_output
        )
        self.config = config
        self.info: EngineInfo = self.client.info
        self.stats = EngineStats(num_free_kv_blocks=self.info.runtime.num_kv_blocks)
        self.input_processor = InputProcessor(self.tokenizer, self.info)
        self.output_processor = OutputProcessor(self.tokenizer)
        # TANDEM_PROFILE: the front end's parts of each step (the core times its own).
        self.profiler = StepProfiler() if envs.profile_dir() else None

    @classmethod
    def from_options(cls, model: str | None = None, **options: Any) -> AsyncLLM:
        return cls(EngineConfig.from_options(model=model, **options))

    # -- requests -------------------------------------------------------------------------
    async def generate(
        self,
        prompt: PromptType,
        params: SamplingParams,
        request_id: str,
        **request_kwargs: Any,
    ) -> AsyncIterator[RequestOutput]:
        """Yield deltas of request ``request_id``; leaving the loop early aborts it.
        Raises ValueError (naming the field) for a request the engine refuses."""
        if self.dead_error is not None:
            raise EngineDeadError("the engine has died") from self.dead_error
        if request_id in self._collectors or request_id in self.output_processor.requests:
            raise ValueError(f"request_id {request_id!r} is already in use")
        self._bind_loop()
        # Cumulative outputs become deltas (a stream sends only what is new); final-only stay.
        kind = (
            RequestOutputKind.DELTA if params.output_kind is RequestOutputKind.CUMULATIVE else None
        )
        state, requests = self.input_processor.process(
            request_id, prompt, params, output_kind=kind, **request_kwargs
        )
        collector = self._collectors[request_id] = _Collector()
        self.output_processor.add_request(state)
        for request in requests:
            self.client.send(AddRequest(request))
        finished = False
        try:
            while not finished:
                output = await collector.get()
                finished = output.finished
                yield output
        finally:
            self._collectors.pop(request_id, None)
            if not finished:
                self._abort(request_id)

    async def abort(self, request_id: str) -> None:
        """Abort a request wherever it is (a finished prefill request: drop its lease)."""
        self._abort(request_id)

    def _abort(self, request_id: str) -> None:
        ids = self.output_processor.engine_ids(request_id) or [request_id]
        self.output_processor.abort(request_id)
        if self.dead_error is None:
            self.client.send(AbortRequests(ids))

    async def call_utility(self, method: str) -> Any:
        """Run one of the core's named utilities (``core_loop.UTILITIES``)."""
        self._bind_loop()
        call_id = next(self._call_ids)
        future = self._calls[call_id] = asyncio.get_running_loop().create_future()
        self.client.send(UtilityCall(call_id, method))
        return await future

    async def start_profile(self) -> None:
        """Start recording where step time goes (needs TANDEM_PROFILE=DIR)."""
        await self.call_utility("start_profile")
        if self.profiler is not None:
            self.profiler.reset()
            self._decode_start = getattr(self.client, "decode_seconds", 0.0)

    async def stop_profile(self) -> dict[str, Any]:
        """The split since ``start_profile``: the core's phases and forward by layer type,
        the front end's parts, the trace file; milliseconds per core step."""
        report = await self.call_utility("stop_profile")
        if self.profiler is not None:
            decoded = getattr(self.client, "decode_seconds", 0.0) - self._decode_start
            self.profiler.add("receive_outputs", decoded)
            self.profiler.num_steps = report["num_steps"]
            report["front_end_ms_per_step"] = self.profiler.report()["phases_ms_per_step"]
        return report

    # -- state ----------------------------------------------------------------------------
    def get_stats(self) -> EngineStats:
        """The core's gauges and counters as of its last step (never blocks)."""
        return self.stats

    def drain_transfer_records(self) -> list[TransferRecord]:
        """KV loads finished since the last call (a decode engine's)."""
        with self._records_lock:
            records, self._records = self._records, []
        return records

    def shutdown(self) -> None:
        self.client.shutdown()

    # -- from the core --------------------------------------------------------------------
    def _bind_loop(self) -> None:
        loop = asyncio.get_running_loop()
        if self._loop is None:
            self._loop = loop
        elif self._loop is not loop:
            raise RuntimeError("AsyncLLM serves one event loop; this is another")

    def _on_output(self, message: CoreOutput) -> None:
        """The core's messages, on the client's thread: state now, the rest on the loop."""
        if isinstance(message, Failed):
            self.dead_error = EngineDeadError(message.error)
            logger.error("the engine died; every request in flight fails")
            self._call_soon(self._fail_all)
            return
        if not isinstance(message, Outputs):
            return
        self.stats = message.stats
        if message.transfer_records:
            with self._records_lock:
                self._records += message.transfer_records
        if message.outputs or message.utility_results:
            self._call_soon(self._process, message)

    def _call_soon(self, callback, *args) -> None:
        loop = self._loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(callback, *args)

    def _process(self, message: Outputs) -> None:
        start = time.perf_counter()
        outputs, stopped = self.output_processor.process(message.outputs)
        if self.profiler is not None:
            self.profiler.add("output_processing", time.perf_counter() - start)
        for output in outputs:
            collector = self._collectors.get(output.request_id)
            if collector is not None:
                collector.put(output)
        if stopped and self.dead_error is None:
            self.client.send(AbortRequests(stopped, stopped=True))
        for result in message.utility_results:
            future = self._calls.pop(result.call_id, None)
            if future is not None and not future.done():
                if result.error is None:
                    future.set_result(result.result)
                else:
                    future.set_exception(RuntimeError(result.error))

    def _fail_all(self) -> None:
        error = EngineDeadError("the engine has died")
        error.__cause__ = self.dead_error
        for collector in self._collectors.values():
            collector.fail(error)
        for future in self._calls.values():
            if not future.done():
                future.set_exception(error)
        self._calls.clear()


class _Collector:
    """One request's deltas not yet taken by its consumer, merged into one."""

    def __init__(self) -> None:
        self._pending: RequestOutput | None = None
        self._error: BaseException | None = None
        self._ready = asyncio.Event()

    def put(self, output: RequestOutput) -> None:
        self._pending = output if self._pending is None else _merge(self._pending, output)
        self._ready.set()

    def fail(self, error: BaseException) -> None:
        self._error = error
        self._ready.set()

    async def get(self) -> RequestOutput:
        await self._ready.wait()
        if self._pending is None and self._error is not None:
            raise self._error
        output, self._pending = self._pending, None
        if self._error is None:
            self._ready.clear()
        return output


def _merge(first: RequestOutput, then: RequestOutput) -> RequestOutput:
    """Two consecutive deltas of one request as one."""
    samples = {c.index: c for c in first.outputs}
    for new in then.outputs:
        old = samples.get(new.index)
        if old is None:
            samples[new.index] = new
            continue
        old.text += new.text
        old.token_ids = old.token_ids + new.token_ids
        if new.logprobs is not None:
            old.logprobs = (old.logprobs or []) + new.logprobs
        old.cumulative_logprob = new.cumulative_logprob
        old.finish_reason, old.stop_reason = new.finish_reason, new.stop_reason
    first.outputs = [samples[i] for i in sorted(samples)]
    if then.prompt_logprobs:
        first.prompt_logprobs = (first.prompt_logprobs or []) + then.prompt_logprobs
    first.finished = then.finished
    first.num_cached_tokens = then.num_cached_tokens
    first.kv_transfer_params = then.kv_transfer_params or first.kv_transfer_params
    first.metrics = {**first.metrics, **then.metrics}
    return first
