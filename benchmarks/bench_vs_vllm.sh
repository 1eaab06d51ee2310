#!/usr/bin/env bash
# Offline throughput of Tandem, vLLM's CPU build and OpenVINO GenAI's continuous-batching
# pipeline on the same workload, one after the other on this machine, in one run, in bfloat16
# and float32; prints every row and Tandem's ratio to each.
#
#   bash benchmarks/bench_vs_vllm.sh [--input-len 128 --output-len 128 --num-prompts 64]
#       [--dtypes bfloat16,float32] [--no-openvino] [--hf]
#
# vLLM (benchmarks/install_vllm_cpu.sh, its own venv) runs twice per dtype: at its best
# setting here, VLLM_CPU_NUM_OF_RESERVED_CPU=0 (the model worker's OpenMP uses every core),
# and at its default, which reserves one of the 2 cores for its busy-polling engine-core
# process. OpenVINO GenAI (benchmarks/install_openvino_genai.sh, its own venv) runs on the
# same weights exported to OpenVINO IR in float32, computing in bf16 or f32 as asked, with
# its default u8-compressed KV cache and again with K and V kept in the compute precision.
# `--hf` adds transformers (sequential and static batches, float32). All read the folder
# Tandem converts from the default GGUF file. Nothing else should run on the machine
# meanwhile: on 2 cores, a busy neighbour stalls OpenMP.
set -euo pipefail
cd "$(dirname "$0")/.."
INPUT_LEN=128 OUTPUT_LEN=128 NUM_PROMPTS=64 DTYPES=bfloat16,float32 OPENVINO=1 HF=none
while [ $# -gt 0 ]; do
    case "$1" in
        --input-len) INPUT_LEN=$2; shift 2 ;;
        --output-len) OUTPUT_LEN=$2; shift 2 ;;
        --num-prompts) NUM_PROMPTS=$2; shift 2 ;;
        --dtypes) DTYPES=$2; shift 2 ;;
        --no-openvino) OPENVINO=0; shift ;;
        --hf) HF=hf; shift ;;
        *) echo "unknown flag $1" >&2; exit 2 ;;
    esac
done
TANDEM="${TANDEM:-.venv/bin/tandem}"
VLLM_VENV="${VLLM_VENV:-/opt/vllm-venv}"
OV_VENV="${OPENVINO_VENV:-/opt/openvino-venv}"
OUT="${OUT_DIR:-$(mktemp -d)}"
mkdir -p "$OUT"
WORKLOAD=(--input-len "$INPUT_LEN" --output-len "$OUTPUT_LEN" --num-prompts "$NUM_PROMPTS")

bash benchmarks/install_vllm_cpu.sh >/dev/null
MODEL_DIR=$(.venv/bin/python -c "from tandem.engine.model_loader import default_model_path; print(default_model_path())")
if [ "$OPENVINO" = 1 ]; then
    OV_MODEL="${OV_MODEL_DIR:-$HOME/.cache/tandem/openvino/$(basename "$MODEL_DIR")}"
    OPENVINO_VENV="$OV_VENV" bash benchmarks/install_openvino_genai.sh "$MODEL_DIR" "$OV_MODEL" >/dev/null
fi

run_vllm() {  # $1: label; the rest: vLLM's environment (NAME=VALUE); DTYPE is set
    local label=$1
    shift
    env "$@" "$VLLM_VENV/bin/python" benchmarks/vllm_throughput.py \
        --model "$MODEL_DIR" "${WORKLOAD[@]}" --seed 0 --dtype "$DTYPE" \
        --output-json "$OUT/vllm-$label-$DTYPE.json" >"$OUT/vllm-$label-$DTYPE.txt" 2>&1
}

for DTYPE in ${DTYPES//,/ }; do
    BASELINE=none
    [ "$DTYPE" = float32 ] && BASELINE=$HF
    "$TANDEM" bench throughput "${WORKLOAD[@]}" --dtype "$DTYPE" --baseline "$BASELINE" \
        --output-json "$OUT/tandem-$DTYPE.json" >"$OUT/tandem-$DTYPE.txt"
    run_vllm best VLLM_CPU_NUM_OF_RESERVED_CPU=0
    run_vllm default
    if [ "$OPENVINO" = 1 ]; then
        PRECISION=f32
        [ "$DTYPE" = bfloat16 ] && PRECISION=bf16
        # Its default KV cache is u8 (compressed) on CPU; the second row keeps K and V in
        # the compute precision, as Tandem and vLLM do.
        for KV in default "$PRECISION"; do
            NAME=openvino
            [ "$KV" = default ] || NAME=openvino-kv
            "$OV_VENV/bin/python" benchmarks/openvino_throughput.py --model "$OV_MODEL" \
                "${WORKLOAD[@]}" --seed 0 --precision "$PRECISION" --kv-cache-precision "$KV" \
                --output-json "$OUT/$NAME-$DTYPE.json" >"$OUT/$NAME-$DTYPE.txt" 2>&1
        done
    fi
done

python3 - "$OUT" "$DTYPES" "$INPUT_LEN" "$OUTPUT_LEN" "$NUM_PROMPTS" <<'PY'
import json, os, sys
out, dtypes, input_len, output_len, num_prompts = sys.argv[1:]
def load(name):
    path = f"{out}/{name}.json"
    return json.load(open(path)) if os.path.exists(path) else None
print(f"\n== offline output tokens/s: {num_prompts} prompts x {input_len} in / {output_len} out, "
      "greedy, EOS ignored; same machine, one run ==")
for dtype in dtypes.split(","):
    t = load(f"tandem-{dtype}")
    tandem = t["tandem"]["output_tokens_per_s"]
    rows = []
    for name, label in (("vllm-best", "vLLM, VLLM_CPU_NUM_OF_RESERVED_CPU=0"),
                        ("vllm-default", "vLLM, default (1 core reserved)"),
                        ("openvino", "OpenVINO GenAI continuous batching (u8 KV cache)"),
                        ("openvino-kv", "OpenVINO GenAI, KV cache in the compute dtype")):
        r = load(f"{name}-{dtype}")
        if r is not None:
            version = r.get("vllm_version") or r.get("openvino_genai_version") or ""
            rows.append((f"{label} {version}", r["output_tokens_per_s"]))
    if "hf_static_output_tokens_per_s" in t:
        rows.append(("transformers sequential", t["hf_sequential_output_tokens_per_s"]))
        rows.append(("transformers static batches", t["hf_static_output_tokens_per_s"]))
    print(f"\n{dtype}")
    print(f"  {'Tandem':<58}{tandem:>9.1f}")
    for label, value in rows:
        print(f"  {label:<58}{value:>9.1f}   Tandem / this = {tandem / value:5.2f}x")
    print(f"  share of Tandem step time outside the model forward: "
          f"{t['tandem']['share_outside_forward']:.1%}")
print(f"\nlogs and JSON: {out}")
PY
