"""Offline generation throughput of OpenVINO GenAI's continuous-batching pipeline.

The same workload as ``tandem bench throughput`` and ``benchmarks/vllm_throughput.py``:
``--num-prompts`` prompts of ``--input-len`` random token ids (the shared recipe, so all
engines see identical inputs), each generating exactly ``--output-len`` tokens greedily with
EOS ignored, in one ``generate`` call; prints output tokens per second. The time excludes
model compilation and a small warmup run.

Standalone: imports only openvino, openvino_genai, the standard library and its sibling
peer_workload.py (the shared workload). Run it with the
venv of benchmarks/install_openvino_genai.sh on a folder that script exported:

    /opt/openvino-venv/bin/python benchmarks/openvino_throughput.py --model /tmp/ov-model \\
        --input-len 128 --output-len 128 --num-prompts 64 --precision bf16

``--precision`` is the CPU plugin's inference precision: OpenVINO computes in bf16 by default
on a CPU with AMX or AVX512-BF16, so float32 rows must ask for f32.
"""

import argparse

from peer_workload import add_workload_args, load_prompts, report, timed_run


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_workload_args(p, "OpenVINO IR folder (optimum-cli export)")
    p.add_argument("--precision", choices=("f32", "bf16"), default="bf16")
    p.add_argument("--cache-gib", type=int, default=2, help="KV cache size")
    p.add_argument(
        "--kv-cache-precision",
        choices=("default", "u8", "f32", "bf16"),
        default="default",
        help="The CPU plugin's KV cache precision; its default on CPU is u8 (compressed)",
    )
    return p.parse_args()


def main():
    args = parse_args()
    import numpy as np
    import openvino as ov
    import openvino_genai as ov_genai

    prompts = load_prompts(args)

    scheduler = ov_genai.SchedulerConfig()
    scheduler.cache_size = args.cache_gib
    scheduler.max_num_seqs = max(64, args.num_prompts)
    scheduler.max_num_batched_tokens = 2048
    scheduler.dynamic_split_fuse = True
    properties = {"INFERENCE_PRECISION_HINT": args.precision}
    if args.kv_cache_precision != "default":
        properties["KV_CACHE_PRECISION"] = args.kv_cache_precision
    pipe = ov_genai.ContinuousBatchingPipeline(args.model, scheduler, "CPU", properties)

    def run(token_ids, max_tokens):
        config = ov_genai.GenerationConfig()
        config.max_new_tokens = max_tokens
        config.min_new_tokens = max_tokens
        config.ignore_eos = True
        config.do_sample = False
        inputs = [ov.Tensor(np.array([ids], dtype=np.int64)) for ids in token_ids]
        return pipe.generate(inputs, [config] * len(inputs))

    results, elapsed = timed_run(run, prompts, args.output_len)
    num_output_tokens = sum(len(r.m_generation_ids[0]) for r in results)
    report("openvino", num_output_tokens, elapsed, args.output_json,
           openvino_genai_version=ov_genai.__version__, precision=args.precision,
           kv_cache_precision=args.kv_cache_precision)  # fmt: skip


if __name__ == "__main__":
    main()
