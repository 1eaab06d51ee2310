#!/usr/bin/env bash
# Create (or verify) a separate virtualenv with OpenVINO GenAI and optimum-intel, used by
# benchmarks/openvino_throughput.py to compare Tandem against OpenVINO's continuous-batching
# pipeline, and export a model folder to OpenVINO IR (float32 weights) once.
#
#   bash benchmarks/install_openvino_genai.sh                      # venv only
#   bash benchmarks/install_openvino_genai.sh MODEL_DIR OUT_DIR    # and export MODEL_DIR
#
# Idempotent: a working venv and an exported folder are only re-checked.
set -euo pipefail

VENV="${OPENVINO_VENV:-/opt/openvino-venv}"
PYTHON="${PYTHON:-python3}"

if [ ! -x "$VENV/bin/python" ]; then
    "$PYTHON" -m venv "$VENV"
fi
if ! "$VENV/bin/python" -c 'import openvino_genai, optimum.intel' 2>/dev/null; then
    # torch first, from the local CPU wheel: optimum-intel's unpinned torch would pull CUDA.
    "$VENV/bin/pip" install -q torch==2.13.0
    "$VENV/bin/pip" install -q openvino-genai==2026.4.1.0 optimum-intel==2.2.0
fi
# PyPI's torchvision is a CUDA build that fails to import beside the CPU torch, and
# transformers then fails too; the export does not need it.
"$VENV/bin/pip" uninstall -y -q torchvision torchaudio >/dev/null 2>&1 || true
"$VENV/bin/python" -c 'import openvino_genai; print("openvino-genai", openvino_genai.__version__)'

if [ $# -ge 2 ]; then
    MODEL_DIR=$1 OUT_DIR=$2
    if [ ! -f "$OUT_DIR/openvino_model.xml" ]; then
        "$VENV/bin/optimum-cli" export openvino --model "$MODEL_DIR" \
            --task text-generation-with-past --weight-format fp32 "$OUT_DIR"
    fi
fi
