#!/usr/bin/env bash
# The evaluation runs behind README's results table (default model, this CPU). Resumable: rerun to finish.
set -euo pipefail
cd "$(dirname "$0")/.."
R=.venv/bin/rain
OUT=results/eval
N=${N:-50}
COMMON=(--preset fast --max-new-tokens 24 --batch "${BATCH:-8}" --quiet)
$R eval selfeval --limit 200 --out $OUT/selfeval.jsonl --quiet
$R eval advbench --limit "$N" --methods vanilla,rain "${COMMON[@]}" --out $OUT/advbench.jsonl
$R eval sentiment --limit "$N" --methods vanilla,rain --value vader "${COMMON[@]}" --out $OUT/sentiment-vader.jsonl
$R eval xstest --shard 0/9 --limit "$N" --methods vanilla,rain "${COMMON[@]}" --out $OUT/xstest.jsonl
$R eval hh --limit "$N" --methods vanilla,rain "${COMMON[@]}" --out $OUT/hh.jsonl
$R eval truthfulqa --limit "$N" --methods vanilla,rain "${COMMON[@]}" --out $OUT/truthfulqa.jsonl
$R report $OUT/*.jsonl --out $OUT/report
