"""Offline throughput: Tandem against Hugging Face transformers on the same workload.

Random-token prompts (EOS ignored) go through transformers one request at a time,
through transformers in static batches, and through Tandem, in one run; the command
prints output tokens/s for each and the ratios. Also prints the share of Tandem's step
time spent outside the model forward (scheduling, input building, sampling, detokenizing).
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch
from tandem.benchmarks.peer_workload import random_prompts


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None, help="Model folder or .gguf (default: SmolLM2)")
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--num-prompts", type=int, default=64)
    parser.add_argument("--baseline", choices=("hf", "none"), default="hf")
    parser.add_argument("--hf-static-batch-size", type=int, default=16)
    parser.add_argument(
        "--hf-sequential-prompts",
        type=int,
        default=8,
        help="Prompts run one at a time through transformers; its rate is per request, "
        "so a subset measures it (all prompts would take minutes).",
    )
    parser.add_argument("--output-json", default=None)
    parser.add_argument(
        "--profile",
        default=None,
        metavar="DIR",
        help="Record where Tandem's step time goes (TANDEM_PROFILE=DIR), print the split "
        "and write a torch profiler trace of the timed run into DIR.",
    )


def run_tandem(args, options: dict, prompts: list[list[int]]) -> dict:
    from tandem.engine import LLM, SamplingParams

    options.setdefault("max_num_seqs", max(args.num_prompts, 1))
    llm = LLM(**options)
    params = SamplingParams(temperature=0.0, max_tokens=args.output_len, ignore_eos=True)
    llm.generate(
        [{"prompt_token_ids": p} for p in prompts[:2]],
        SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True),
        use_tqdm=False,
    )
    llm.engine.timing.__init__()  # count the timed run only
    profiler = llm.engine.core.profiler
    if profiler is not None:
        profiler.reset()
        profiler.start_trace()
    start = time.perf_counter()
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params)
    elapsed = time.perf_counter() - start
    if profiler is not None:
        from tandem.engine.profiling import format_report

        trace = profiler.stop_trace("throughput")
        print(format_report(profiler.report(), "Tandem step time"))
        print(f"torch profiler trace: {trace}")
    num_tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
    timing = llm.engine.timing
    outside = 1.0 - timing.forward_seconds / timing.step_seconds
    return {
        "output_tokens_per_s": num_tokens / elapsed,
        "elapsed_s": elapsed,
        "num_output_tokens": num_tokens,
        "share_outside_forward": outside,
        "model_dir": str(llm.engine.model_dir),
        "dtype": str(llm.engine.runner.dtype).removeprefix("torch."),
    }


def _hf_generate(model, batch: list[list[int]], output_len: int) -> int:
    ids = torch.tensor(batch)
    out = model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        do_sample=False,
        max_new_tokens=output_len,
        min_new_tokens=output_len,
        pad_token_id=0,
    )
    return (out.shape[1] - ids.shape[1]) * out.shape[0]


def run_hf(model_dir: str, prompts: list[list[int]], args) -> dict:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    _hf_generate(model, prompts[:1], 4)  # warm-up
    results = {}
    with torch.inference_mode():
        subset = prompts[: args.hf_sequential_prompts]
        start = time.perf_counter()
        tokens = sum(_hf_generate(model, [p], args.output_len) for p in subset)
        results["hf_sequential"] = tokens / (time.perf_counter() - start)
        bs = args.hf_static_batch_size
        start = time.perf_counter()
        tokens = sum(
            _hf_generate(model, prompts[i : i + bs], args.output_len)
            for i in range(0, len(prompts), bs)
        )
        results["hf_static"] = tokens / (time.perf_counter() - start)
    return results


def main(args: argparse.Namespace) -> int:
    from tandem.engine.model_loader import load_hf_config, resolve_model_path
    from tandem.services.cli import engine_options

    torch.manual_seed(0)
    if args.profile:
        os.environ["TANDEM_PROFILE"] = args.profile  # read when the engine is built
    model_dir = resolve_model_path(args.model)
    vocab_size = load_hf_config(model_dir).vocab_size
    prompts = random_prompts(vocab_size, args.input_len, args.num_prompts, args.seed)
    options = engine_options(args)  # --seed seeds both the prompts and the engine
    tandem = run_tandem(args, options, prompts)
    report = {
        "workload": {"input_len": args.input_len, "output_len": args.output_len,
                     "num_prompts": args.num_prompts, "threads": torch.get_num_threads()},
        "tandem": tandem,
    }  # fmt: skip
    rows = [("tandem", tandem["output_tokens_per_s"])]
    if args.baseline == "hf":
        hf = run_hf(str(model_dir), prompts, args)
        report["hf_sequential_output_tokens_per_s"] = hf["hf_sequential"]
        report["hf_static_output_tokens_per_s"] = hf["hf_static"]
        report["ratio_vs_hf_sequential"] = tandem["output_tokens_per_s"] / hf["hf_sequential"]
        report["ratio_vs_hf_static"] = tandem["output_tokens_per_s"] / hf["hf_static"]
        rows.append((f"transformers sequential ({args.hf_sequential_prompts} prompts)",
                     hf["hf_sequential"]))  # fmt: skip
        rows.append((f"transformers static batch {args.hf_static_batch_size}", hf["hf_static"]))
    threads = torch.get_num_threads()
    print(f"\nWorkload: {args.num_prompts} prompts x {args.input_len} in / {args.output_len} out, "
          f"greedy, EOS ignored, {threads} threads, Tandem in {tandem['dtype']}")  # fmt: skip
    print(f"{'system':<40}{'output tok/s':>14}")
    for label, value in rows:
        print(f"{label:<40}{value:>14.1f}")
    for key in ("ratio_vs_hf_sequential", "ratio_vs_hf_static"):
        if key in report:
            print(f"{key:<40}{report[key]:>13.2f}x")
    share = tandem["share_outside_forward"]
    print(f"share of Tandem step time outside the model forward: {share:.1%}")
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump(report, f, indent=2)
    return 0
