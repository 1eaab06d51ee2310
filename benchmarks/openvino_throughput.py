"""Offline generation throughput of OpenVINO GenAI's continuous-batching pipeline.

The same workload as ``tandem bench throughput`` and ``benchmarks/vllm_throughput.py``:
``--num-prompts`` prompts of ``--input-len`` random token ids (the shared recipe, so all
engines see identical inputs), each generating exactly ``--output-len`` tokens greedily with
EOS ignored, in one ``generate`` call; prints output tokens per second. The time excludes
model compilation and a small warmup run.

Standalone: imports only openvino, openvino_genai and the standard library. Run it with the
venv of benchmarks/install_openvino_genai.sh on a folder that script exported:

    /opt/openvino-venv/bin/python benchmarks/openvino_throughput.py --model /tmp/ov-model \\
        --input-len 128 --output-len 128 --num-prompts 64 --precision bf16

``--precision`` is the CPU plugin's inference precision: OpenVINO computes in bf16 by default
on a CPU with AMX or AVX512-BF16, so float32 rows must ask for f32.
"""

import argparse
import json
import os
import random
import time


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, help="OpenVINO IR folder (optimum-cli export)")
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--num-prompts", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--precision", choices=("f32", "bf16"), default="bf16")
    p.add_argument("--cache-gib", type=int, default=2, help="KV cache size")
    p.add_argument("--output-json", default=None)
    return p.parse_args()


def make_prompts(vocab_size, input_len, num_prompts, seed):
    rng = random.Random(seed)
    return [[rng.randrange(vocab_size) for _ in range(input_len)] for _ in range(num_prompts)]


def main():
    args = parse_args()
    import numpy as np
    import openvino as ov
    import openvino_genai as ov_genai

    with open(os.path.join(args.model, "config.json")) as f:
        vocab_size = json.load(f)["vocab_size"]
    prompts = make_prompts(vocab_size, args.input_len, args.num_prompts, args.seed)

    scheduler = ov_genai.SchedulerConfig()
    scheduler.cache_size = args.cache_gib
    scheduler.max_num_seqs = max(64, args.num_prompts)
    scheduler.max_num_batched_tokens = 2048
    scheduler.dynamic_split_fuse = True
    properties = {"INFERENCE_PRECISION_HINT": args.precision}
    pipe = ov_genai.ContinuousBatchingPipeline(args.model, scheduler, "CPU", properties)

    def run(token_ids, max_tokens):
        config = ov_genai.GenerationConfig()
        config.max_new_tokens = max_tokens
        config.min_new_tokens = max_tokens
        config.ignore_eos = True
        config.do_sample = False
        inputs = [ov.Tensor(np.array([ids], dtype=np.int64)) for ids in token_ids]
        return pipe.generate(inputs, [config] * len(inputs))

    run(prompts[:2], 4)  # warmup

    start = time.perf_counter()
    results = run(prompts, args.output_len)
    elapsed = time.perf_counter() - start

    num_output_tokens = sum(len(r.m_generation_ids[0]) for r in results)
    tok_per_s = num_output_tokens / elapsed
    print(f"openvino output tokens/s: {tok_per_s:.2f}")
    if args.output_json:
        result = {
            "output_tokens_per_s": tok_per_s,
            "elapsed_s": elapsed,
            "num_output_tokens": num_output_tokens,
            "openvino_genai_version": ov_genai.__version__,
            "precision": args.precision,
        }
        with open(args.output_json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
