"""The flags of ``tandem bench serve``: vLLM's ``vllm bench serve`` names and defaults."""

from __future__ import annotations

import argparse
import json

DATASETS = ("random", "prefix_repetition", "sharegpt")
BACKEND_ENDPOINTS = {"openai": "/v1/completions", "openai-chat": "/v1/chat/completions"}


def add_args(parser: argparse.ArgumentParser) -> None:
    server = parser.add_argument_group("server")
    server.add_argument(
        "--backend",
        choices=tuple(BACKEND_ENDPOINTS),
        default="openai",
        help="openai: the completions API; openai-chat: the chat completions API.",
    )
    server.add_argument(
        "--base-url",
        default=None,
        help="Server URL, e.g. http://10.0.0.2:8000 (default: --host and --port).",
    )
    server.add_argument("--host", default="127.0.0.1")
    server.add_argument("--port", type=int, default=8000)
    server.add_argument(
        "--endpoint",
        default=None,
        help="API path (default: /v1/completions, or /v1/chat/completions for openai-chat).",
    )
    server.add_argument(
        "--header",
        metavar="KEY=VALUE",
        nargs="*",
        default=[],
        help="Extra HTTP headers, e.g. --header Authorization='Bearer sk-...'.",
    )
    server.add_argument(
        "--model",
        default=None,
        help="Model name sent in requests (default: the first one the server's "
        "/v1/models lists). A local folder also gives the tokenizer.",
    )
    server.add_argument(
        "--served-model-name", default=None, help="Name to send instead of --model."
    )
    server.add_argument(
        "--tokenizer",
        default=None,
        help="Local tokenizer folder for building prompts (default: --model when it is a "
        "local folder, else the default Tandem model's).",
    )
    server.add_argument(
        "--ready-check-timeout-sec",
        type=int,
        default=600,
        help="Send one test request first, retrying up to this long; 0 skips the check.",
    )

    data = parser.add_argument_group("dataset")
    data.add_argument("--dataset-name", choices=DATASETS, default="random")
    data.add_argument("--dataset-path", default=None, help="The ShareGPT JSON file.")
    data.add_argument("--num-prompts", type=int, default=1000)
    data.add_argument("--seed", type=int, default=0)
    data.add_argument("--random-input-len", type=int, default=1024)
    data.add_argument("--random-output-len", type=int, default=128)
    data.add_argument(
        "--random-range-ratio",
        type=float,
        default=0.0,
        help="Lengths are drawn uniformly from [len * (1 - r), len * (1 + r)]; r in [0, 1).",
    )
    data.add_argument(
        "--random-prefix-len",
        type=int,
        default=0,
        help="Tokens of one random prefix shared by all prompts, before the random part.",
    )
    data.add_argument("--prefix-repetition-prefix-len", type=int, default=256)
    data.add_argument("--prefix-repetition-suffix-len", type=int, default=256)
    data.add_argument(
        "--prefix-repetition-num-prefixes",
        type=int,
        default=10,
        help="Distinct prefixes; each starts --num-prompts // this many prompts.",
    )
    data.add_argument("--prefix-repetition-output-len", type=int, default=128)
    data.add_argument(
        "--sharegpt-output-len",
        type=int,
        default=None,
        help="Output length for every ShareGPT request (default: the reply's length).",
    )

    traffic = parser.add_argument_group("traffic")
    traffic.add_argument(
        "--request-rate",
        type=float,
        default=float("inf"),
        help="Requests per second; inf sends them all at once.",
    )
    traffic.add_argument(
        "--burstiness",
        type=float,
        default=1.0,
        help="Shape of the gamma-distributed gaps between requests: 1 is a Poisson "
        "process, below 1 burstier, above 1 more even. Needs a finite --request-rate.",
    )
    traffic.add_argument(
        "--max-concurrency", type=int, default=None, help="Most requests in flight at once."
    )
    traffic.add_argument(
        "--ignore-eos",
        action="store_true",
        help="Ask the server to generate every requested token (always on for random).",
    )
    traffic.add_argument(
        "--temperature", type=float, default=None, help="Sampling temperature (default 0)."
    )
    traffic.add_argument("--top-p", type=float, default=None)
    traffic.add_argument("--top-k", type=int, default=None)
    traffic.add_argument(
        "--extra-body",
        type=json.loads,
        default=None,
        help="JSON merged into every request body, e.g. '{\"min_tokens\": 8}'.",
    )

    report = parser.add_argument_group("report")
    report.add_argument(
        "--percentile-metrics",
        default="ttft,tpot,itl",
        help="Comma-separated metrics to report: ttft, tpot, itl, e2el.",
    )
    report.add_argument(
        "--metric-percentiles",
        default="99",
        help='Comma-separated percentiles to report, e.g. "50,90,99".',
    )
    report.add_argument(
        "--goodput",
        nargs="+",
        default=None,
        metavar="KEY:MS",
        help="Service level objectives in milliseconds (ttft, tpot, e2el), e.g. "
        "--goodput ttft:200 tpot:50; goodput counts requests meeting all of them.",
    )
    report.add_argument("--save-result", action="store_true", help="Write the result JSON.")
    report.add_argument(
        "--save-detailed",
        action="store_true",
        help="Also save per-request lists (input_lens, output_lens, ttfts, itls, "
        "generated_texts, errors).",
    )
    report.add_argument("--result-dir", default=None)
    report.add_argument(
        "--result-filename",
        "--result-file",
        dest="result_filename",
        default=None,
        help="Default: {label}-{rate}qps[-concurrency{N}]-{model}-{date}.json.",
    )
    report.add_argument("--label", default=None, help="File name prefix (default: --backend).")
    report.add_argument("--disable-tqdm", action="store_true", help="No progress bar.")
    report.add_argument(
        "--profile",
        action="store_true",
        help="Around the main run, call the server's /start_profile and /stop_profile "
        "(vLLM's; a Tandem server started with TANDEM_PROFILE=DIR) and print where its "
        "step time went.",
    )
