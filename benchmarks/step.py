"""Decode step time against this machine's limits: reading the weights once, and the matmuls.

For each batch size, the engine decodes that many requests of ``--context`` prompt tokens and
the command prints the mean decode step beside two floors measured on this machine now:
the time to read every weight once at the measured memory bandwidth (what bounds a step at
batch 1), and the time of the model's own linear layers as bare ``torch.matmul`` calls on
the same shapes and dtype (what bounds a large batch), with the step's ratio to the larger.
"""

from __future__ import annotations

import argparse
import json
import random
import time

import torch


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--batch-sizes", default="1,16,64", help="Comma-separated batch sizes")
    parser.add_argument("--context", type=int, default=128, help="Prompt tokens per request")
    parser.add_argument("--steps", type=int, default=32, help="Decode steps timed per batch")
    parser.add_argument("--output-json", default=None)


def memory_bandwidth(nbytes: int = 1 << 30, repeats: int = 5) -> float:
    """Bytes per second read by a sum over a tensor far larger than the caches."""
    data = torch.ones(nbytes // 4, dtype=torch.float32)
    return nbytes / _best_of(repeats, data.sum)


def _linear_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The model's linear layers, plain or packed (``engine/models/cpu_linear.py``)."""
    return [m for m in model.modules() if hasattr(m, "in_features") and hasattr(m, "out_features")]


def _best_of(repeats: int, run) -> float:
    """The shortest of ``repeats + 1`` timed calls of ``run`` (the extra one warms up; the
    minimum discards it)."""
    best = float("inf")
    for _ in range(repeats + 1):
        start = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - start)
    return best


@torch.inference_mode()
def matmul_seconds(
    layers: list[torch.nn.Module], batch: int, dtype: torch.dtype, repeats: int = 5
) -> float:
    """One pass over the model's linear shapes at ``batch`` rows, the faster of bare
    ``torch.matmul`` on weights of those shapes and the model's own layers called alone.

    Each shape has its own weight, as in the model, so that a pass reads them all from
    memory as a decode step does.
    """
    shapes = [(m.in_features, m.out_features) for m in layers]
    weights = [torch.randn(k, n).to(dtype) for k, n in shapes]
    inputs = {k: torch.randn(batch, k).to(dtype) for k, _ in shapes}

    def bare() -> None:
        for (k, _), w in zip(shapes, weights):
            torch.matmul(inputs[k], w)

    def own() -> None:
        for m in layers:
            m(inputs[m.in_features])

    return min(_best_of(repeats, bare), _best_of(repeats, own))


def decode_step_seconds(llm, batch: int, context: int, steps: int, vocab: int) -> float:
    """Mean decode step: ``steps + 1`` tokens minus 1 token, over the same prompts (the
    one-token run is the prefill alone)."""
    from tandem.engine import SamplingParams

    rng = random.Random(batch)
    prompts = [
        {"prompt_token_ids": [rng.randrange(vocab) for _ in range(context)]} for _ in range(batch)
    ]

    def run(max_tokens: int) -> float:
        params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
        llm.reset_prefix_cache()
        start = time.perf_counter()
        llm.generate(prompts, params, use_tqdm=False)
        return time.perf_counter() - start

    run(2)  # warm-up at this batch size
    return max(run(steps + 1) - run(1), 0.0) / steps


def main(args: argparse.Namespace) -> int:
    from tandem.engine import LLM
    from tandem.services.cli import engine_options

    batches = [int(b) for b in args.batch_sizes.split(",") if b]
    options = engine_options(args)
    options.setdefault("max_num_seqs", max(batches))
    llm = LLM(**options)
    runner = llm.engine.runner
    model, dtype = runner.model, runner.dtype
    weight_bytes = runner.weight_bytes_after  # packed weights are not parameters
    layers = _linear_layers(model)
    bandwidth = memory_bandwidth()
    read = weight_bytes / bandwidth
    vocab = llm.engine.runtime.vocab_size
    rows = []
    for batch in batches:
        step = decode_step_seconds(llm, batch, args.context, args.steps, vocab)
        matmul = matmul_seconds(layers, batch, dtype)
        rows.append({"batch": batch, "step_ms": step * 1e3, "weight_read_ms": read * 1e3,
                     "matmul_ms": matmul * 1e3, "ratio": step / max(read, matmul)})  # fmt: skip
    print(
        f"\nDecode step, {dtype}, {args.context}-token prompts, {torch.get_num_threads()} "
        f"threads; weights {weight_bytes / 2**20:.0f} MiB, memory bandwidth "
        f"{bandwidth / 1e9:.1f} GB/s (sum over 1 GiB)"
    )
    print(f"{'batch':>6}{'step ms':>10}{'read weights ms':>17}{'matmuls ms':>12}{'step/limit':>12}")
    for r in rows:
        print(f"{r['batch']:>6}{r['step_ms']:>10.1f}{r['weight_read_ms']:>17.1f}"
              f"{r['matmul_ms']:>12.1f}{r['ratio']:>11.2f}x")  # fmt: skip
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump({"dtype": str(dtype), "bandwidth": bandwidth, "rows": rows}, f, indent=2)
    return 0
