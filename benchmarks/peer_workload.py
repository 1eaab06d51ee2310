"""The offline workload every engine in ``benchmarks/bench_vs_vllm.sh`` runs, in one place.

``--num-prompts`` prompts of ``--input-len`` random token ids drawn from one seeded recipe, so
that Tandem (``tandem bench throughput``), vLLM (``vllm_throughput.py``) and OpenVINO GenAI
(``openvino_throughput.py``) see identical inputs; each generates exactly ``--output-len``
tokens greedily with EOS ignored, timed after a small warm-up, excluding model loading.

Standard library only: the peers' drivers run in their own venvs without Tandem installed and
import this file as a sibling (``python benchmarks/X.py`` puts this folder on sys.path).
"""

import argparse
import json
import os
import random
import time


def random_prompts(vocab_size: int, input_len: int, num_prompts: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(vocab_size) for _ in range(input_len)] for _ in range(num_prompts)]


def add_workload_args(parser: argparse.ArgumentParser, model_help: str) -> None:
    parser.add_argument("--model", required=True, help=model_help)
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--num-prompts", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output-json", default=None)


def load_prompts(args: argparse.Namespace) -> list[list[int]]:
    """The workload's prompts over the vocabulary of the model folder ``args.model``."""
    with open(os.path.join(args.model, "config.json")) as f:
        vocab_size = json.load(f)["vocab_size"]
    return random_prompts(vocab_size, args.input_len, args.num_prompts, args.seed)


def timed_run(run, prompts: list[list[int]], output_len: int):
    """``run(prompts, max_tokens)`` once on two prompts to warm up, then timed on all of them;
    returns its result and the seconds it took."""
    run(prompts[:2], 4)
    start = time.perf_counter()
    result = run(prompts, output_len)
    return result, time.perf_counter() - start


def report(
    system: str, num_output_tokens: int, elapsed: float, output_json: str | None, **extra
) -> None:
    """Prints the output tokens/s and writes them, with ``extra``, to ``output_json``."""
    tok_per_s = num_output_tokens / elapsed
    print(f"{system} output tokens/s: {tok_per_s:.2f}")
    if output_json:
        result = {"output_tokens_per_s": tok_per_s, "elapsed_s": elapsed,
                  "num_output_tokens": num_output_tokens, **extra}  # fmt: skip
        with open(output_json, "w") as f:
            json.dump(result, f, indent=2)
