"""``/metrics``: vLLM's metric set under the ``tandem:`` prefix, with a ``model_name`` label.

Engine gauges and counters (running / waiting requests, KV usage, prefix-cache queries and
hits, preemptions) are read from ``LLMEngine.get_stats()`` at scrape time. Token counters,
finish reasons and latency histograms are recorded here, per request, as its output deltas
arrive: time to first token and inter-token latency are measured in the server (from the
request's arrival at the handler), queue time comes from the engine's
``RequestOutput.metrics["queue_time"]``. Behind the router, the decode instance reports how
long loading a request's KV took and how many bytes moved (``metrics["kv_transfer_seconds"]``
and ``["kv_transfer_bytes"]``): ``tandem:kv_transfer_seconds`` and ``tandem:kv_transfer_bytes``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from tandem.engine.outputs import RequestOutput
from tandem.engine.stats import EngineStats

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

_TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.08, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80)
_ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1, 2.5, 5, 10, 20)
_TRANSFER_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)
_LATENCY_BUCKETS = (0.3, 0.5, 1, 1.5, 2, 2.5, 5, 10, 15, 20, 30, 60, 120, 240, 480, 960)


# EngineStats field -> help; the field names are vLLM's metric names.
_ENGINE_GAUGES = {
    "num_requests_running": "Requests in the running batch.",
    "num_requests_waiting": "Requests waiting to be scheduled.",
    "kv_cache_usage_perc": "Fraction of KV blocks in use (1 = full); cached free blocks are free.",
}
_ENGINE_COUNTERS = {
    "prefix_cache_queries": "Prompt tokens looked up in the prefix cache.",
    "prefix_cache_hits": "Prompt tokens found in the prefix cache.",
    "num_preemptions": "Requests preempted (to be recomputed).",
}


class _EngineCollector:
    """Engine state as of the scrape; the counters are the engine's running totals."""

    def __init__(
        self, model_name: str, get_stats: Callable[[], EngineStats], is_dead: Callable[[], bool]
    ) -> None:
        self.model_name = model_name
        self.get_stats = get_stats
        self.is_dead = is_dead

    def collect(self) -> Iterator[Metric]:
        dead = GaugeMetricFamily(
            "tandem:engine_dead",
            "1 once the engine can never serve again (it died; see the server log), else 0.",
            labels=["model_name"],
        )
        dead.add_metric([self.model_name], float(self.is_dead()))
        yield dead
        stats = self.get_stats()
        for table, family_type in (
            (_ENGINE_GAUGES, GaugeMetricFamily),
            (_ENGINE_COUNTERS, CounterMetricFamily),
        ):
            for name, doc in table.items():
                family = family_type(f"tandem:{name}", doc, labels=["model_name"])
                family.add_metric([self.model_name], getattr(stats, name))
                yield family


class ServerMetrics:
    def __init__(
        self,
        model_name: str,
        get_stats: Callable[[], EngineStats],
        is_dead: Callable[[], bool] = lambda: False,
    ) -> None:
        disable_created_metrics()  # no *_created series, as in vLLM's output
        self.registry = CollectorRegistry()
        self.registry.register(_EngineCollector(model_name, get_stats, is_dead))

        def counter(name: str, doc: str) -> Counter:
            metric = Counter(f"tandem:{name}", doc, ["model_name"], registry=self.registry)
            return metric.labels(model_name)

        def histogram(name: str, doc: str, buckets: tuple[float, ...]) -> Histogram:
            metric = Histogram(
                f"tandem:{name}", doc, ["model_name"], buckets=buckets, registry=self.registry
            )
            return metric.labels(model_name)

        self.prompt_tokens = counter("prompt_tokens", "Prompt tokens processed.")
        self.generation_tokens = counter("generation_tokens", "Tokens generated.")
        self._success = Counter(
            "tandem:request_success",
            "Finished samples, by finish reason.",
            ["model_name", "finished_reason"],
            registry=self.registry,
        )
        self.model_name = model_name
        for reason in ("stop", "length", "abort"):  # every series exists from the start
            self._success.labels(model_name, reason)
        self.ttft = histogram(
            "time_to_first_token_seconds", "Request arrival to first token.", _TTFT_BUCKETS
        )
        self.itl = histogram(
            "inter_token_latency_seconds", "Time between output deltas.", _ITL_BUCKETS
        )
        self.e2e = histogram(
            "e2e_request_latency_seconds", "Request arrival to its last token.", _LATENCY_BUCKETS
        )
        self.queue_time = histogram(
            "request_queue_time_seconds", "Engine arrival to first scheduled.", _LATENCY_BUCKETS
        )
        self.kv_transfer_seconds = histogram(
            "kv_transfer_seconds",
            "Time to load one request's KV blocks from a prefill instance.",
            _TRANSFER_BUCKETS,
        )
        self.kv_transfer_bytes = counter(
            "kv_transfer_bytes", "Bytes of KV blocks loaded from prefill instances."
        )

    def count_finished(self, reason: str) -> None:
        self._success.labels(self.model_name, reason).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def track(self) -> RequestTracker:
        return RequestTracker(self)


class RequestTracker:
    """One user request's timings; feed it every delta, then ``close()`` it."""

    def __init__(self, metrics: ServerMetrics) -> None:
        self.metrics = metrics
        self.arrival = time.monotonic()
        self.last_token_time: float | None = None
        self.finished_indexes: set[int] = set()
        self.num_samples = 0
        self.done = False

    def observe(self, output: RequestOutput) -> None:
        now = time.monotonic()
        m = self.metrics
        self.num_samples = max(self.num_samples, len(output.outputs))
        num_new = sum(len(c.token_ids) for c in output.outputs)
        if num_new:
            if self.last_token_time is None:
                m.ttft.observe(now - self.arrival)
                m.prompt_tokens.inc(len(output.prompt_token_ids))
            else:
                m.itl.observe(now - self.last_token_time)
            self.last_token_time = now
            m.generation_tokens.inc(num_new)
        for c in output.outputs:
            if c.finish_reason is not None and c.index not in self.finished_indexes:
                self.finished_indexes.add(c.index)
                m.count_finished(c.finish_reason)
        if "kv_transfer_seconds" in output.metrics:  # reported once, with the first delta
            m.kv_transfer_seconds.observe(output.metrics["kv_transfer_seconds"])
            m.kv_transfer_bytes.inc(output.metrics.get("kv_transfer_bytes", 0))
        if output.finished and not self.done:
            self.done = True
            m.e2e.observe(now - self.arrival)
            queue_time = output.metrics.get("queue_time")
            if queue_time is not None:
                m.queue_time.observe(queue_time)

    def discard(self) -> None:
        """The engine refused the request: nothing to count."""
        self.done = True

    def close(self) -> None:
        """A request that ends before its last delta (client gone, error) counts as aborted."""
        if not self.done:
            for _ in range(max(self.num_samples, 1) - len(self.finished_indexes)):
                self.metrics.count_finished("abort")
            self.done = True
