"""Sending the workload: arrival times, the concurrency cap, the progress bar.

Between the dataset and the metrics: ``arrival_times`` spaces the requests (all at once
for an infinite rate, else gamma-distributed gaps), ``run`` sends each at its time
through ``client.send_request`` with at most ``max_concurrency`` in flight, and returns
the outputs in request order with the wall time the whole run took.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections.abc import Sequence
from typing import NamedTuple

import aiohttp
import numpy as np
from tandem.benchmarks.serve.client import RequestInput, RequestOutput, send_request
from tqdm import tqdm

# A single request may legitimately stream for a long time (long outputs on a loaded
# server); the cap only keeps a dead connection from hanging the benchmark for ever.
REQUEST_TIMEOUT_S = 6 * 60 * 60


class RunResult(NamedTuple):
    outputs: list[RequestOutput]
    duration_s: float


def arrival_times(
    num_requests: int, request_rate: float, burstiness: float, rng: np.random.Generator
) -> list[float]:
    """Seconds after the start at which each request is sent.

    Gaps are gamma-distributed with shape ``burstiness`` and scale
    ``1 / (request_rate * burstiness)``, so their mean is ``1 / request_rate`` whatever
    the burstiness: 1 is a Poisson process, below 1 burstier, above 1 more regular.
    The times are then scaled so the last request goes at ``num_requests / request_rate``,
    which keeps the offered load the same from one seed to the next.
    """
    if not burstiness > 0:
        raise ValueError(f"--burstiness must be positive, got {burstiness}")
    if not request_rate > 0:
        raise ValueError(f"--request-rate must be positive, got {request_rate}")
    if math.isinf(request_rate) or num_requests == 0:
        return [0.0] * num_requests
    if math.isinf(burstiness):
        gaps = np.full(num_requests, 1.0 / request_rate)
    else:
        gaps = rng.gamma(
            shape=burstiness, scale=1.0 / (request_rate * burstiness), size=num_requests
        )
    times = np.cumsum(gaps)
    times *= (num_requests / request_rate) / times[-1]
    return times.tolist()


def new_session(max_concurrency: int | None) -> aiohttp.ClientSession:
    # aiohttp's default pool of 100 connections would queue requests beyond it without
    # a word; the pool is sized to the concurrency cap instead (0: no limit).
    connector = aiohttp.TCPConnector(limit=max_concurrency or 0)
    return aiohttp.ClientSession(
        connector=connector, timeout=aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S)
    )


async def run(
    session: aiohttp.ClientSession,
    requests: Sequence[RequestInput],
    send_times: Sequence[float],
    max_concurrency: int | None,
    show_progress: bool = True,
) -> RunResult:
    semaphore = asyncio.Semaphore(max_concurrency) if max_concurrency else None
    progress = tqdm(total=len(requests), disable=not show_progress)

    async def one(request: RequestInput) -> RequestOutput:
        async with semaphore or contextlib.nullcontext():
            output = await send_request(session, request)
        progress.update(1)
        return output

    start = time.perf_counter()
    tasks = []
    for request, send_at in zip(requests, send_times):
        delay = start + send_at - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(request)))
    outputs = await asyncio.gather(*tasks)
    duration = time.perf_counter() - start
    progress.close()
    return RunResult(list(outputs), duration)


async def wait_until_ready(
    session: aiohttp.ClientSession, probe: RequestInput, timeout_s: float
) -> RequestOutput:
    """Sends ``probe`` until one succeeds or ``timeout_s`` passes; returns the last try.

    A server that is still loading refuses connections, so a failure before the
    deadline is retried rather than reported.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        output = await send_request(session, probe)
        if output.success or time.monotonic() >= deadline:
            return output
        await asyncio.sleep(min(5.0, max(0.0, deadline - time.monotonic())))
