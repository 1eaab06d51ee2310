#!/usr/bin/env bash
# The same `tandem bench serve` workload against `tandem up` (1 prefill, 1 decode, KV over
# UCX or NCCL) and against `tandem serve` (colocated), one after the other on this
# machine; prints TTFT, TPOT, ITL and throughput side by side, and the share of TTFT the
# disaggregated run spent moving KV (from the router's tandem:kv_transfer_seconds).
#
#   bash benchmarks/bench_pd_vs_colocated.sh [--input-len 256] [--output-len 64] \
#       [--num-prompts 32] [--max-concurrency 8] [--kv-transport ucx|nccl] [MODEL]
#
# `tandem up` splits the cores between its two engines; `tandem serve` gets them all.
set -euo pipefail
cd "$(dirname "$0")/.."
INPUT_LEN=256 OUTPUT_LEN=64 NUM_PROMPTS=32 CONCURRENCY=8 TRANSPORT=ucx MODEL=()
while [ $# -gt 0 ]; do
    case "$1" in
        --input-len) INPUT_LEN=$2; shift 2 ;;
        --output-len) OUTPUT_LEN=$2; shift 2 ;;
        --num-prompts) NUM_PROMPTS=$2; shift 2 ;;
        --max-concurrency) CONCURRENCY=$2; shift 2 ;;
        --kv-transport) TRANSPORT=$2; shift 2 ;;
        -*) echo "unknown flag $1" >&2; exit 2 ;;
        *) MODEL=("$1"); shift ;;
    esac
done
TANDEM="${TANDEM:-.venv/bin/tandem}"
OUT="${OUT_DIR:-$(mktemp -d)}"
mkdir -p "$OUT"
PORT="${PORT:-8011}"
URL="http://127.0.0.1:$PORT"
ENGINE=(--kv-cache-memory 512MiB --max-model-len $((INPUT_LEN + OUTPUT_LEN + 64)))
source benchmarks/server_lib.sh

run_bench() {  # $1: label
    "$TANDEM" bench serve --port "$PORT" --dataset-name random --random-input-len "$INPUT_LEN" \
        --random-output-len "$OUTPUT_LEN" --num-prompts "$NUM_PROMPTS" \
        --max-concurrency "$CONCURRENCY" --save-result --result-dir "$OUT" \
        --result-filename "$1.json" --disable-tqdm >"$OUT/$1.txt"
}

"$TANDEM" up "${MODEL[@]}" --port "$PORT" --kv-transport "$TRANSPORT" \
    --remote-prefill-min-tokens 1 "${ENGINE[@]}" >"$OUT/up.log" 2>&1 &
SERVER_PID=$!
wait_healthy 600
run_bench disaggregated
curl -sf "$URL/metrics" >"$OUT/disaggregated.metrics"
stop_server

"$TANDEM" serve "${MODEL[@]}" --port "$PORT" "${ENGINE[@]}" >"$OUT/serve.log" 2>&1 &
SERVER_PID=$!
wait_healthy 600
run_bench colocated
stop_server

python3 - "$OUT" "$TRANSPORT" <<'PY'
import json, re, sys
out, transport = sys.argv[1], sys.argv[2]
runs = {name: json.load(open(f"{out}/{name}.json")) for name in ("colocated", "disaggregated")}
metrics = open(f"{out}/disaggregated.metrics").read()

def sample(name: str) -> float:
    found = re.findall(rf"^{re.escape(name)}(?:{{[^}}]*}})? (\S+)$", metrics, re.M)
    return sum(float(v) for v in found)

rows = [
    ("mean TTFT (ms)", "mean_ttft_ms"),
    ("median TTFT (ms)", "median_ttft_ms"),
    ("mean TPOT (ms)", "mean_tpot_ms"),
    ("mean ITL (ms)", "mean_itl_ms"),
    ("output tokens/s", "output_throughput"),
    ("requests/s", "request_throughput"),
]
print(f"\n{'':<20}{'colocated':>14}{'disaggregated':>16}{'ratio':>9}   (KV over {transport})")
for label, key in rows:
    c, d = runs["colocated"][key], runs["disaggregated"][key]
    print(f"{label:<20}{c:>14.2f}{d:>16.2f}{d / c if c else float('nan'):>9.2f}")
seconds, count = sample("tandem:kv_transfer_seconds_sum"), sample("tandem:kv_transfer_seconds_count")
moved = sample("tandem:kv_transfer_bytes_total")
ttft_total = runs["disaggregated"]["mean_ttft_ms"] / 1000 * runs["disaggregated"]["completed"]
print(f"\nKV transfers: {int(count)}, {moved / 2**20:.1f} MiB, mean {1000 * seconds / max(count, 1):.2f} ms")
print(f"share of TTFT spent in KV transfer: {100 * seconds / ttft_total:.1f}%")
print(f"(results and logs in {out})")
PY
