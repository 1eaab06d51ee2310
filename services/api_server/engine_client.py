"""What the OpenAI layer runs requests on: an ``EngineClient``.

``tandem serve`` wraps its own ``AsyncLLM`` (``LocalEngineClient``); ``tandem router``
sends each request through a prefill and a decode instance over gRPC
(``tandem.services.router.remote.RemoteEngineClient``). The HTTP routes, protocol,
streaming, errors and metrics are the same code for both.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from tandem.engine.outputs import RequestOutput
from tandem.engine.sampling_params import SamplingParams
from tandem.engine.stats import EngineStats

if TYPE_CHECKING:
    from tandem.engine.async_llm import AsyncLLM


class EngineUnavailableError(RuntimeError):
    """No engine can take the request now (all instances down or draining): a 503 whose
    message says which."""


class EngineClient(ABC):
    """Runs tokenized requests and reports the engine's state.

    ``generate`` yields ``RequestOutput`` deltas (``RequestOutputKind.DELTA``); closing the
    iterator early aborts the request wherever it runs. It raises ``ValueError`` for a
    request the engine refuses (a 400 naming the field), ``EngineUnavailableError`` (503)
    when nothing can serve it, and may yield an output whose ``metrics["error"]`` says the
    engine failed it after it started. ``metrics`` may also carry ``queue_time``,
    ``kv_transfer_seconds`` and ``kv_transfer_bytes``.
    """

    tokenizer: Any
    max_model_len: int
    vocab_size: int
    profiler: Any = None  # a StepProfiler of the HTTP side's parts, in profiling mode

    async def start_profile(self) -> None:
        raise NotImplementedError("profiling is not available behind this server")

    async def stop_profile(self) -> dict[str, Any]:
        raise NotImplementedError("profiling is not available behind this server")

    @property
    @abstractmethod
    def dead_error(self) -> BaseException | None:
        """Why the engine can never serve again, or None while it can."""

    @abstractmethod
    def generate(
        self, prompt: dict[str, Any], params: SamplingParams, request_id: str
    ) -> AsyncIterator[RequestOutput]:
        """Deltas of one request; ``prompt`` holds ``prompt_token_ids`` (and ``prompt``,
        ``cache_salt``)."""

    @abstractmethod
    def get_stats(self) -> EngineStats:
        """Engine gauges and running counters, read at scrape time (never blocks)."""


class LocalEngineClient(EngineClient):
    """The engine in this process (``tandem serve``)."""

    def __init__(self, async_llm: AsyncLLM) -> None:
        self.async_llm = async_llm
        self.tokenizer = async_llm.tokenizer
        self.max_model_len = async_llm.info.runtime.max_model_len
        self.vocab_size = async_llm.info.runtime.vocab_size

    @property
    def dead_error(self) -> BaseException | None:
        return self.async_llm.dead_error

    def generate(
        self, prompt: dict[str, Any], params: SamplingParams, request_id: str
    ) -> AsyncIterator[RequestOutput]:
        return self.async_llm.generate(prompt, params, request_id)

    def get_stats(self) -> EngineStats:
        return self.async_llm.get_stats()

    @property
    def profiler(self) -> Any:
        return self.async_llm.profiler

    async def start_profile(self) -> None:
        await self.async_llm.start_profile()

    async def stop_profile(self) -> dict[str, Any]:
        return await self.async_llm.stop_profile()
