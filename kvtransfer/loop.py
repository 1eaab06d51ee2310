"""The process-wide transfer thread: one asyncio loop that every remote connector shares.

UCX binds its worker progress to the event loop that first touches it, and one process may
hold several engines (tests, benchmarks), so all transfers of a process run on one loop in
one daemon thread; the engine thread only submits coroutines and never waits on the wire.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


class TransferLoop:
    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, name="tandem-kv-transfer", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    def submit(self, coro: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        """Run ``coro`` on the transfer thread; returns at once."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def call(self, coro: Coroutine[Any, Any, T], timeout: float | None = 30.0) -> T:
        """Run ``coro`` on the transfer thread and wait for its result (setup only)."""
        return self.submit(coro).result(timeout)


_lock = threading.Lock()
_loop: TransferLoop | None = None


def transfer_loop() -> TransferLoop:
    """The process's transfer loop, started on first use."""
    global _loop
    with _lock:
        if _loop is None:
            _loop = TransferLoop()
        return _loop
