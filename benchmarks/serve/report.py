"""The printed ``Serving Benchmark Result`` block and the result JSON, in vLLM's layout.

Last stage of the benchmark. The block's labels, widths (a 40-wide label column, a
10-wide value column) and section rules are vLLM's, and so are the JSON keys, so that
scripts which read ``vllm bench serve`` output read ours unchanged.
"""

from __future__ import annotations

import json
import math
import pathlib
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from tandem.benchmarks.serve.client import RequestOutput
from tandem.benchmarks.serve.metrics import BenchmarkMetrics

WIDTH = 50
# (key, label, section title) in printing order.
_SECTIONS = (
    ("ttft", "TTFT", "Time to First Token"),
    ("tpot", "TPOT", "Time per Output Token (excl. 1st token)"),
    ("itl", "ITL", "Inter-token Latency"),
    ("e2el", "E2EL", "End-to-end Latency"),
)
# Per-request lists, left out of the saved JSON unless --save-detailed.
DETAILED_KEYS = ("input_lens", "output_lens", "ttfts", "itls", "generated_texts", "errors")


def _row(label: str, value: int | str | None) -> str:
    return f"{label:<40} {value!s:<10}"


def _row_2f(label: str, value: float) -> str:
    return f"{label:<40} {value:<10.2f}"


def percentile_word(p: float) -> str:
    """99.0 -> "99", 99.9 -> "99.9": how a percentile reads in labels and keys."""
    return str(int(p)) if int(p) == p else str(p)


def result_block(
    metrics: BenchmarkMetrics,
    duration_s: float,
    request_rate: float,
    max_concurrency: int | None,
    goodput: bool,
    selected_metrics: Sequence[str],
) -> list[str]:
    """The printed lines, banner to closing rule."""
    lines = [f"{' Serving Benchmark Result ':=^{WIDTH}}"]
    lines.append(_row("Successful requests:", metrics.completed))
    lines.append(_row("Failed requests:", metrics.failed))
    if max_concurrency is not None:
        lines.append(_row("Maximum request concurrency:", max_concurrency))
    if not math.isinf(request_rate):
        lines.append(_row_2f("Request rate configured (RPS):", request_rate))
    lines.append(_row_2f("Benchmark duration (s):", duration_s))
    lines.append(_row("Total input tokens:", metrics.total_input))
    lines.append(_row("Total generated tokens:", metrics.total_output))
    lines.append(_row_2f("Request throughput (req/s):", metrics.request_throughput))
    if goodput:
        lines.append(_row_2f("Request goodput (req/s):", metrics.request_goodput))
    lines.append(_row_2f("Output token throughput (tok/s):", metrics.output_throughput))
    lines.append(_row_2f("Peak output token throughput (tok/s):", metrics.max_output_tokens_per_s))
    lines.append(_row_2f("Peak concurrent requests:", metrics.max_concurrent_requests))
    lines.append(_row_2f("Total token throughput (tok/s):", metrics.total_token_throughput))
    for key, name, title in _SECTIONS:
        if key not in selected_metrics:
            continue
        stats = metrics.stats[key]
        lines.append(f"{title:-^{WIDTH}}")
        lines.append(_row_2f(f"Mean {name} (ms):", stats.mean_ms))
        lines.append(_row_2f(f"Median {name} (ms):", stats.median_ms))
        for p, value in stats.percentiles_ms:
            lines.append(_row_2f(f"P{percentile_word(p)} {name} (ms):", value))
    lines.append("=" * WIDTH)
    return lines


def benchmark_result(
    metrics: BenchmarkMetrics,
    outputs: Sequence[RequestOutput],
    duration_s: float,
    goodput: bool,
    selected_metrics: Sequence[str],
) -> dict[str, Any]:
    """The measured part of the result JSON (vLLM's ``benchmark()`` return value)."""
    result: dict[str, Any] = {
        "duration": duration_s,
        "completed": metrics.completed,
        "failed": metrics.failed,
        "total_input_tokens": metrics.total_input,
        "total_output_tokens": metrics.total_output,
        "request_throughput": metrics.request_throughput,
        "request_goodput": metrics.request_goodput if goodput else None,
        "output_throughput": metrics.output_throughput,
        "total_token_throughput": metrics.total_token_throughput,
        "input_lens": metrics.input_lens,
        "output_lens": metrics.output_lens,
        "ttfts": [o.ttft for o in outputs],
        "itls": [o.itl for o in outputs],
        "generated_texts": [o.generated_text for o in outputs],
        "errors": [o.error for o in outputs],
        "max_output_tokens_per_s": metrics.max_output_tokens_per_s,
        "max_concurrent_requests": metrics.max_concurrent_requests,
    }
    for key, _, _ in _SECTIONS:
        if key not in selected_metrics:
            continue
        stats = metrics.stats[key]
        result[f"mean_{key}_ms"] = stats.mean_ms
        result[f"median_{key}_ms"] = stats.median_ms
        result[f"std_{key}_ms"] = stats.std_ms
        for p, value in stats.percentiles_ms:
            result[f"p{percentile_word(p)}_{key}_ms"] = value
    return result


def run_header(
    *,
    backend: str,
    label: str | None,
    model_id: str,
    tokenizer_id: str,
    num_prompts: int,
    request_rate: float,
    burstiness: float,
    max_concurrency: int | None,
    date: str,
) -> dict[str, Any]:
    """The setup part of the result JSON, written before the measured keys."""
    return {
        "date": date,
        "endpoint_type": backend,
        "backend": backend,
        "label": label,
        "model_id": model_id,
        "tokenizer_id": tokenizer_id,
        "num_prompts": num_prompts,
        "request_rate": "inf" if math.isinf(request_rate) else request_rate,
        "burstiness": burstiness,
        "max_concurrency": max_concurrency,
    }


def now_stamp() -> str:
    return datetime.now().strftime("%Y%m%d-%H%M%S")


def default_result_name(
    label: str, request_rate: float, max_concurrency: int | None, model_id: str, date: str
) -> str:
    """``{label}-{rate}qps[-concurrency{N}]-{model}-{date}.json``, vLLM's file name."""
    concurrency = f"-concurrency{max_concurrency}" if max_concurrency is not None else ""
    base_model = model_id.rstrip("/").split("/")[-1]
    return f"{label}-{request_rate}qps{concurrency}-{base_model}-{date}.json"


def save_result(result: dict[str, Any], path: pathlib.Path, detailed: bool) -> None:
    if not detailed:
        result = {k: v for k, v in result.items() if k not in DETAILED_KEYS}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result), encoding="utf-8")
