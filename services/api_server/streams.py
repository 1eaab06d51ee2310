"""Async plumbing between the engine's per-request streams and HTTP: merging several
streams, cancelling work when the client goes away, and the SSE response that closes its
stream however it ends (closing an engine stream aborts its request)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TypeVar

from starlette.requests import Request
from starlette.responses import StreamingResponse
from tandem.services.api_server.errors import APIError, logger
from tandem.services.api_server.responses import sse

T = TypeVar("T")


async def sse_response(
    raw_request: Request,
    stream: AsyncIterator[T],
    events: Callable[[AsyncIterator[T]], AsyncIterator[str]],
) -> StreamingResponse:
    """SSE of ``events(stream)``. Errors before the first delta get their HTTP status;
    later ones are sent in-band, then ``[DONE]``."""
    try:
        first = await until_disconnect(raw_request, anext(stream))
    except BaseException:
        await stream.aclose()
        raise

    async def items() -> AsyncIterator[T]:
        yield first
        async for item in stream:
            yield item

    async def body() -> AsyncIterator[str]:
        try:
            async for event in events(items()):
                yield event
        except APIError as e:
            yield sse(e.to_json())
        except Exception:  # noqa: BLE001 - the client must hear that the stream broke
            logger.exception("error while streaming a response")
            yield sse(APIError(500, "Internal server error", type="server_error").to_json())
        finally:
            await stream.aclose()
        yield sse("[DONE]")

    return SSEResponse(body(), media_type="text/event-stream")


class SSEResponse(StreamingResponse):
    """Closes its stream however the response ends, so a vanished client's requests are
    aborted now rather than whenever the generator is garbage collected."""

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.body_iterator.aclose()


_END = object()


async def merge_streams(streams: list[AsyncIterator[T]]) -> AsyncIterator[tuple[int, T]]:
    """Items of several streams as they come, tagged with the stream's index."""
    if len(streams) == 1:
        async with contextlib.aclosing(streams[0]) as stream:
            async for item in stream:
                yield 0, item
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(index: int, stream: AsyncIterator[T]) -> None:
        try:
            async with contextlib.aclosing(stream):
                async for item in stream:
                    queue.put_nowait((index, item))
            queue.put_nowait((index, _END))
        except Exception as e:  # noqa: BLE001 - re-raised by the consumer
            queue.put_nowait((index, e))

    tasks = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(streams)]
    try:
        num_open = len(tasks)
        while num_open:
            index, item = await queue.get()
            if item is _END:
                num_open -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield index, item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def until_disconnect(request: Request, work: Awaitable[T]) -> T:
    """Await ``work``; if the client goes away first, cancel it (aborting its requests)."""
    task = asyncio.ensure_future(work)

    async def disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watcher = asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)  # let it clean up
    if task.cancelled():
        raise APIError(499, "The client closed the request.", code="client_closed_request")
    return task.result()
