#!/usr/bin/env bash
# float32 against bfloat16 for the default model on the CPU (issue 22): the self-evaluation on 200 HH
# harmless-base pairs with each dtype (does bf16 judge as f32 does?), and the same RAIN searches with each
# (seconds, answers that differ). Records under results/dtype_cpu/; rain report prints the AUCs.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=results/dtype_cpu
mkdir -p "$OUT"
for dtype in float32 bfloat16; do
  .venv/bin/rain eval selfeval --limit 200 --dtype "$dtype" --threads 1 --quiet --out "$OUT/selfeval-$dtype.jsonl"
done
.venv/bin/python - "$OUT" <<'PY'
import sys
from pathlib import Path

from rain_llm.evaluation.records import read_records
from rain_llm.evaluation.report import selfeval_aucs

for path in sorted(Path(sys.argv[1]).glob("selfeval-*.jsonl")):
    aucs = selfeval_aucs(read_records(path))
    print(path.stem, {k: f"{e.mean:.4f} [{e.lower:.3f}, {e.upper:.3f}]" for k, e in aucs.items()})
PY
for dtype in float32 bfloat16 float32 bfloat16; do  # in turn, twice: the machine's load drifts
  .venv/bin/rain bench --prompts 4 --methods rain --fixed-budget --max-new-tokens 16 --t-max 12 --threads 1 \
    --dtype "$dtype" --out "$OUT/bench-$dtype-$(date +%s).json"
done
