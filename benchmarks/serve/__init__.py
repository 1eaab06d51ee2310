"""Online serving benchmark against any OpenAI-compatible server (``vllm bench serve``'s format).

``tandem bench serve`` builds a workload (``datasets``), sends it at the requested rate
and concurrency (``runner``, ``client``), folds the timings into TTFT/TPOT/ITL/E2EL and
throughput (``metrics``), then prints vLLM's ``Serving Benchmark Result`` block and
writes vLLM's result JSON (``report``).
"""

from __future__ import annotations

import argparse
import asyncio
import pathlib
import sys
from typing import TYPE_CHECKING, Any

import numpy as np
from tandem.benchmarks.serve import datasets, report, runner
from tandem.benchmarks.serve.args import BACKEND_ENDPOINTS, add_args
from tandem.benchmarks.serve.client import RequestInput, first_model_id
from tandem.benchmarks.serve.metrics import METRIC_NAMES, calculate_metrics, parse_goodput

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

__all__ = ["add_args", "main"]


class BenchmarkError(Exception):
    """A run that cannot go on; the message says what to change."""


def resolve_urls(args: argparse.Namespace) -> tuple[str, str]:
    """(base URL, request URL), checking that the endpoint fits the backend."""
    base_url = (args.base_url or f"http://{args.host}:{args.port}").rstrip("/")
    endpoint = args.endpoint or BACKEND_ENDPOINTS[args.backend]
    expected = BACKEND_ENDPOINTS[args.backend].removeprefix("/v1")
    if not endpoint.rstrip("/").endswith(expected):
        raise BenchmarkError(
            f"--endpoint {endpoint} does not fit --backend {args.backend}, which posts "
            f"to a path ending in {expected}"
        )
    return base_url, base_url + "/" + endpoint.lstrip("/")


def load_tokenizer_for(tokenizer_arg: str | None, model_id: str) -> tuple[Any, str]:
    """The tokenizer prompts are built with, and the id the result JSON names it by."""
    from tandem.engine.model_loader import default_model_path, resolve_model_path
    from tandem.engine.tokenizer import load_tokenizer

    if tokenizer_arg is not None:
        return load_tokenizer(resolve_model_path(tokenizer_arg)), tokenizer_arg
    if pathlib.Path(model_id).expanduser().exists():
        return load_tokenizer(resolve_model_path(model_id)), model_id
    path = default_model_path()
    print(
        f"Model {model_id!r} is not a local folder; building prompts with the default "
        f"Tandem model's tokenizer ({path}). Pass --tokenizer to choose another."
    )
    return load_tokenizer(path), str(path)


def load_requests(
    args: argparse.Namespace, tokenizer: PreTrainedTokenizerBase, rng: np.random.Generator
) -> list[datasets.SampleRequest]:
    if args.dataset_name == "random":
        return datasets.random_requests(
            tokenizer,
            args.num_prompts,
            args.random_input_len,
            args.random_output_len,
            args.random_range_ratio,
            args.random_prefix_len,
            rng,
        )
    if args.dataset_name == "prefix_repetition":
        return datasets.prefix_repetition_requests(
            tokenizer,
            args.num_prompts,
            args.prefix_repetition_prefix_len,
            args.prefix_repetition_suffix_len,
            args.prefix_repetition_num_prefixes,
            args.prefix_repetition_output_len,
            rng,
        )
    if args.dataset_path is None:
        raise BenchmarkError("--dataset-name sharegpt needs --dataset-path FILE.json")
    return datasets.sharegpt_requests(
        args.dataset_path, tokenizer, args.num_prompts, args.sharegpt_output_len, rng
    )


def request_body_extras(args: argparse.Namespace) -> dict[str, Any]:
    sampling = {"temperature": 0.0 if args.temperature is None else args.temperature}
    if args.top_p is not None:
        sampling["top_p"] = args.top_p
    if args.top_k is not None:
        sampling["top_k"] = args.top_k
    return {**sampling, **(args.extra_body or {})}


def parse_headers(items: list[str]) -> dict[str, str]:
    headers = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise BenchmarkError(f"--header {item!r}: write KEY=VALUE")
        headers[key.strip()] = value.strip()
    return headers


async def _benchmark(args: argparse.Namespace) -> dict[str, Any]:
    base_url, api_url = resolve_urls(args)
    slos = parse_goodput(args.goodput)
    selected = [m.strip() for m in args.percentile_metrics.split(",") if m.strip()]
    if unknown := set(selected) - set(METRIC_NAMES):
        raise BenchmarkError(f"--percentile-metrics: unknown {sorted(unknown)}")
    percentiles = [float(p) for p in args.metric_percentiles.split(",")]
    if args.num_prompts < 1:
        raise BenchmarkError(f"--num-prompts must be at least 1, got {args.num_prompts}")
    seeds = np.random.SeedSequence(args.seed).spawn(2)
    data_rng, arrival_rng = (np.random.default_rng(s) for s in seeds)
    # Random prompts are only meaningful at their drawn lengths, as in vLLM.
    ignore_eos = args.ignore_eos or args.dataset_name == "random"

    async with runner.new_session(args.max_concurrency) as session:
        model_id = args.model or await first_model_id(session, base_url)
        tokenizer, tokenizer_id = load_tokenizer_for(args.tokenizer, model_id)
        samples = load_requests(args, tokenizer, data_rng)
        extra_body, headers = request_body_extras(args), parse_headers(args.header)
        inputs = [
            RequestInput(
                api_url=api_url,
                model=args.served_model_name or model_id,
                prompt=s.prompt,
                prompt_len=s.prompt_len,
                output_len=s.expected_output_len,
                chat=args.backend == "openai-chat",
                ignore_eos=ignore_eos,
                extra_body=extra_body,
                headers=headers,
            )
            for s in samples
        ]
        if args.ready_check_timeout_sec > 0:
            print("Starting initial single prompt test run...")
            probe = await runner.wait_until_ready(session, inputs[0], args.ready_check_timeout_sec)
            if not probe.success:
                raise BenchmarkError(f"the initial test request to {api_url} failed: {probe.error}")
            print("Initial test run completed.")
        else:
            print("Skipping endpoint ready check.")
        print("Starting main benchmark run...")
        distribution = "Poisson process" if args.burstiness == 1.0 else "Gamma distribution"
        print(f"Traffic request rate: {args.request_rate}")
        print(f"Burstiness factor: {args.burstiness} ({distribution})")
        print(f"Maximum request concurrency: {args.max_concurrency}")
        send_times = runner.arrival_times(
            len(inputs), args.request_rate, args.burstiness, arrival_rng
        )
        if args.profile:
            await _profile_call(session, base_url, "start_profile")
        outputs, duration = await runner.run(
            session, inputs, send_times, args.max_concurrency, not args.disable_tqdm
        )
        if args.profile:
            from tandem.engine.profiling import format_report

            split = await _profile_call(session, base_url, "stop_profile")
            print(format_report(split, "server step time"))
            if split.get("trace"):
                print(f"torch profiler trace: {split['trace']}")

    metrics = calculate_metrics(
        outputs,
        duration,
        percentiles,
        slos,
        lambda text: len(tokenizer(text, add_special_tokens=False).input_ids),
    )
    failed = [o.error for o in outputs if not o.success]
    if failed:
        print(f"{len(failed)} requests failed; the first: {failed[0]}", file=sys.stderr)
    for line in report.result_block(
        metrics, duration, args.request_rate, args.max_concurrency, bool(slos), selected
    ):
        print(line)
    date = report.now_stamp()
    result = report.run_header(
        backend=args.backend,
        label=args.label,
        model_id=model_id,
        tokenizer_id=tokenizer_id,
        num_prompts=args.num_prompts,
        request_rate=args.request_rate,
        burstiness=args.burstiness,
        max_concurrency=args.max_concurrency,
        date=date,
    )
    result.update(report.benchmark_result(metrics, outputs, duration, bool(slos), selected))
    if args.save_result:
        name = args.result_filename or report.default_result_name(
            args.label or args.backend, args.request_rate, args.max_concurrency, model_id, date
        )
        path = pathlib.Path(args.result_dir or ".") / name
        report.save_result(result, path, args.save_detailed)
    return result


async def _profile_call(session: Any, base_url: str, route: str) -> dict[str, Any]:
    async with session.post(f"{base_url}/{route}") as response:
        if response.status != 200:
            raise BenchmarkError(
                f"--profile: POST /{route} answered {response.status}: {await response.text()}"
                " (start the server with TANDEM_PROFILE=DIR)"
            )
        return await response.json() if route == "stop_profile" else {}


def main(args: argparse.Namespace) -> int:
    """Runs the benchmark; 0 when at least one request completed."""
    try:
        result = asyncio.run(_benchmark(args))
    except (BenchmarkError, ValueError, RuntimeError, OSError) as exc:
        print(f"tandem bench serve: error: {exc}", file=sys.stderr)
        return 2
    return 0 if result["completed"] > 0 else 1
