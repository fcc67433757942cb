#!/usr/bin/env bash
# What RAIN costs at the paper's budgets, per answer, measured on this CPU: the default model, one prompt
# per task, vanilla and RAIN at each task's paper preset, 32 answer tokens (README "The paper's
# experiments on GPUs" scales the LM tokens and forward passes per answer token to the presets' 128).
# About 45 min at 1 thread on a shared 2-core machine. Records and report in results/paper/cost-cpu.
set -euo pipefail
cd "$(dirname "$0")/.."
R=.venv/bin/rain
O=${1:-results/paper/cost-cpu}
C=(--limit 1 --methods vanilla,rain --threads "${THREADS:-1}" --quiet --max-new-tokens 32)
$R eval hh --preset paper-hh "${C[@]}" --out "$O/hh.jsonl"
$R eval advbench --variant smoothllm --preset paper-advbench "${C[@]}" --out "$O/advbench-smoothllm.jsonl"
$R eval truthfulqa --preset paper-truthfulqa "${C[@]}" --out "$O/truthfulqa.jsonl"
$R eval xstest --preset paper-hh "${C[@]}" --out "$O/xstest.jsonl"
$R report "$O"/*.jsonl --out "$O/report"
