#!/usr/bin/env bash
# The evaluation clients researchers point at `rain serve`, each in its own virtual environment (their
# dependencies stay out of .venv): EleutherAI's lm-evaluation-harness in .venv-lmeval (lm-eval, the API
# models only: no torch) and UK AISI's Inspect in .venv-inspect (inspect, with the openai package its
# openai-api provider needs). tests/test_eval_clients.py runs both against a real `rain serve`.
# Safe to run again: nothing happens once both work.
#   PYTHON=...         the interpreter to build them from (default python3)
#   LMEVAL_SPEC=...    default lm_eval[api]==0.4.13
#   INSPECT_SPEC=...   default inspect-ai==0.3.285 (with openai==3.63.0)
# Measured (2 cores): about 2 minutes, 0.8 GB + 0.4 GB.
set -euo pipefail
cd "$(dirname "$0")/.."
setup() {  # setup VENV CHECK SPEC...
  local venv=$1 check=$2
  shift 2
  if "$venv/bin/python" -c "$check" >/dev/null 2>&1; then
    return 0
  fi
  if [ ! -x "$venv/bin/python" ]; then
    "${PYTHON:-python3}" -m venv "$venv"
  fi
  "$venv/bin/python" -m pip install -q --disable-pip-version-check "$@"
  "$venv/bin/python" -c "$check"
}
setup .venv-lmeval "import lm_eval.models.openai_completions" "${LMEVAL_SPEC:-lm_eval[api]==0.4.13}"
setup .venv-inspect "import inspect_ai, openai" "${INSPECT_SPEC:-inspect-ai==0.3.285}" "openai==3.63.0"
echo "lm-eval $(.venv-lmeval/bin/python -c 'import importlib.metadata as m; print(m.version("lm_eval"))') in .venv-lmeval," \
  "inspect-ai $(.venv-inspect/bin/python -c 'import importlib.metadata as m; print(m.version("inspect_ai"))') in .venv-inspect"
