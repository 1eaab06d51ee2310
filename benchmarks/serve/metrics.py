"""From per-request timings to the benchmark's numbers (the definitions vLLM uses).

Third stage of the benchmark: ``calculate_metrics`` folds the runner's ``RequestOutput``s
into ``BenchmarkMetrics``, which ``report`` prints and saves. Per successful request:

- TTFT: sending to the first chunk with a choice.
- TPOT: ``(e2el - ttft) / (output_tokens - 1)``, the mean time per token after the first
  (requests with one token have none; goodput counts their TPOT as 0).
- ITL: every gap between consecutive chunks, pooled over all requests.
- E2EL: sending to the last chunk.

Goodput is completed requests per second that meet every given SLO (milliseconds).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import NamedTuple

import numpy as np
from tandem.benchmarks.serve.client import RequestOutput

METRIC_NAMES = ("ttft", "tpot", "itl", "e2el")
GOODPUT_METRICS = ("ttft", "tpot", "e2el")


class MetricStats(NamedTuple):
    mean_ms: float
    median_ms: float
    std_ms: float
    percentiles_ms: list[tuple[float, float]]  # (percentile, value) per --metric-percentiles


@dataclasses.dataclass(frozen=True)
class BenchmarkMetrics:
    completed: int
    failed: int
    total_input: int
    total_output: int
    request_throughput: float
    request_goodput: float
    output_throughput: float
    total_token_throughput: float
    stats: dict[str, MetricStats]  # keyed by METRIC_NAMES
    # Busiest one-second bucket of output chunks, and the most requests in flight in any
    # one-second bucket.
    max_output_tokens_per_s: float
    max_concurrent_requests: int
    input_lens: list[int]  # per request, failed ones included
    output_lens: list[int]  # per request, 0 for failed ones


def summarize(values_s: Sequence[float], percentiles: Sequence[float]) -> MetricStats:
    """Mean, median, population std and percentiles in milliseconds; all 0 when empty
    (a server that does not stream gives no ITLs, for one)."""
    data = np.asarray(values_s if len(values_s) else [0.0], dtype=float) * 1000.0
    return MetricStats(
        mean_ms=float(np.mean(data)),
        median_ms=float(np.median(data)),
        std_ms=float(np.std(data)),
        percentiles_ms=[(float(p), float(np.percentile(data, p))) for p in percentiles],
    )


def request_tpot(output: RequestOutput, num_output_tokens: int) -> float | None:
    """Seconds per output token after the first, or None for a one-token request."""
    if num_output_tokens <= 1:
        return None
    return (output.latency - output.ttft) / (num_output_tokens - 1)


def parse_goodput(pairs: Sequence[str] | None) -> dict[str, float]:
    """``["ttft:200", "tpot:50"]`` -> ``{"ttft": 200.0, "tpot": 50.0}`` (milliseconds)."""
    slos: dict[str, float] = {}
    for pair in pairs or ():
        name, sep, value = pair.partition(":")
        try:
            slos[name] = float(value) if sep else math.nan
        except ValueError:
            slos[name] = math.nan
        if name not in GOODPUT_METRICS:
            raise ValueError(
                f"--goodput {pair!r}: the metric must be one of {', '.join(GOODPUT_METRICS)}"
            )
        if not slos[name] >= 0:  # also catches NaN, a missing or unparsable number
            raise ValueError(f"--goodput {pair!r}: write KEY:MILLISECONDS, a number >= 0")
    return slos


def meets_slos(ttft_s: float, tpot_s: float, e2el_s: float, slos_ms: dict[str, float]) -> bool:
    measured = {"ttft": ttft_s, "tpot": tpot_s, "e2el": e2el_s}
    return all(measured[name] * 1000.0 <= slo for name, slo in slos_ms.items())


def peak_output_throughput(outputs: Sequence[RequestOutput]) -> tuple[float, int]:
    """The most output chunks in any one-second bucket (buckets counted from the first
    request's start) and the most requests active in any bucket."""
    done = [o for o in outputs if o.success]
    if not done:
        return 0.0, 0
    origin = min(o.start_time for o in done)
    num_buckets = int(math.ceil(max(o.start_time + o.latency for o in done) - origin)) + 1
    tokens = np.zeros(num_buckets)
    active = np.zeros(num_buckets)
    for o in done:
        token_time = o.start_time + o.ttft
        times = [token_time]
        for gap in o.itl:
            token_time += gap
            times.append(token_time)
        for t in times:
            bucket = int(t - origin)
            if 0 <= bucket < num_buckets:
                tokens[bucket] += 1
        first, last = int(o.start_time - origin), int(o.start_time + o.latency - origin)
        active[first : last + 1] += 1
    return float(tokens.max()), int(active.max())


def calculate_metrics(
    outputs: Sequence[RequestOutput],
    duration_s: float,
    percentiles: Sequence[float],
    slos_ms: dict[str, float],
    count_tokens: Callable[[str], int],
) -> BenchmarkMetrics:
    """``count_tokens`` measures the generated text of a server that sent no usage."""
    output_lens: list[int] = []
    ttfts: list[float] = []
    tpots: list[float] = []
    itls: list[float] = []
    e2els: list[float] = []
    total_input = num_good = 0
    for o in outputs:
        if not o.success:
            output_lens.append(0)
            continue
        num_tokens = o.output_tokens
        if num_tokens is None:
            num_tokens = count_tokens(o.generated_text)
        output_lens.append(num_tokens)
        total_input += o.prompt_len
        tpot = request_tpot(o, num_tokens)
        if tpot is not None:
            tpots.append(tpot)
        ttfts.append(o.ttft)
        itls.extend(o.itl)
        e2els.append(o.latency)
        if slos_ms and meets_slos(o.ttft, tpot or 0.0, o.latency, slos_ms):
            num_good += 1
    completed = len(ttfts)
    total_output = sum(output_lens)
    max_tokens_per_s, max_concurrent = peak_output_throughput(outputs)
    return BenchmarkMetrics(
        completed=completed,
        failed=len(outputs) - completed,
        total_input=total_input,
        total_output=total_output,
        request_throughput=completed / duration_s,
        request_goodput=num_good / duration_s,
        output_throughput=total_output / duration_s,
        total_token_throughput=(total_input + total_output) / duration_s,
        stats={
            "ttft": summarize(ttfts, percentiles),
            "tpot": summarize(tpots, percentiles),
            "itl": summarize(itls, percentiles),
            "e2el": summarize(e2els, percentiles),
        },
        max_output_tokens_per_s=max_tokens_per_s,
        max_concurrent_requests=max_concurrent,
        input_lens=[o.prompt_len for o in outputs],
        output_lens=output_lens,
    )
