#!/usr/bin/env bash
# The RAIN paper's experiments (Li et al., ICLR 2024) as one recipe: a model served by vLLM on your
# GPUs, an LM judge behind any OpenAI-compatible endpoint, every task at the paper's budget, then
# `rain report`. README "The paper's experiments on GPUs" gives the cost of each size.
#
#   bash benchmarks/paper.sh --engine-url http://gpu1:8000 [--engine-url http://gpu2:8000 ...] \
#       --judge-url http://judge:8000/v1 --judge-name Qwen/Qwen2.5-72B-Instruct [options] [-- rain eval flags]
#
#   --out DIR           results folder (default results/paper)
#   --shard i/n         this machine's share of every task (0-based); run each shard, then `rain report`
#                       on all the files (this script reports on what DIR holds when it ends)
#   --limit N           first N prompts of every task (of this shard); default: all
#   --batch N           answers in flight (default 16 per engine URL)
#   --methods LIST      default vanilla,rain (add best-of-n for the sample-evaluate baseline at RAIN's compute)
#   --tasks LIST        default hh,advbench,truthfulqa,xstest
#   --variants LIST     AdvBench GCG suffix sets (default smoothllm,jbb-vicuna,jbb-llama2; `none` adds plain goals)
#   --model NAME        the tokenizer (default: the folder the server reports; give the hub id or a local copy
#                       when this machine cannot read that folder)
#   --judge-key-env V   variable holding the judge's API key (default OPENAI_API_KEY)
#   --rain CMD          the rain command (default .venv/bin/rain)
#   after --             passed to every `rain eval` (flags win over the presets: a dry run's small budget)
#
# Budgets: HH and XSTest paper-hh (T_min 6, T_max 50, V 0.8, 128 new tokens), AdvBench paper-advbench
# (T_min 5, temperature 2), TruthfulQA paper-truthfulqa (T_min 16, truthfulness self-evaluation).
# Resumable: every `rain eval` skips the (prompt, method) pairs its file holds, so rerun after a stop.
set -euo pipefail
cd "$(dirname "$0")/.."

die() { echo "paper.sh: error: $*" >&2; exit 2; }

URLS=() JUDGE_URL="" JUDGE_NAME="" OUT=results/paper SHARD="" LIMIT="" BATCH="" METHODS=vanilla,rain
TASKS=hh,advbench,truthfulqa,xstest VARIANTS=smoothllm,jbb-vicuna,jbb-llama2 MODEL="" KEY_ENV=OPENAI_API_KEY
R=.venv/bin/rain EXTRA=()
while [ $# -gt 0 ]; do
  case "$1" in
    --engine-url|--judge-url|--judge-name|--out|--shard|--limit|--batch|--methods|--tasks|--variants|--model|\
    --judge-key-env|--rain)
      [ $# -ge 2 ] || die "$1 needs a value"
      case "$1" in
        --engine-url) URLS+=("$2") ;; --judge-url) JUDGE_URL=$2 ;; --judge-name) JUDGE_NAME=$2 ;;
        --out) OUT=$2 ;; --shard) SHARD=$2 ;; --limit) LIMIT=$2 ;; --batch) BATCH=$2 ;;
        --methods) METHODS=$2 ;; --tasks) TASKS=$2 ;; --variants) VARIANTS=$2 ;; --model) MODEL=$2 ;;
        --judge-key-env) KEY_ENV=$2 ;; --rain) R=$2 ;;
      esac
      shift 2 ;;
    --) shift; EXTRA=("$@"); break ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) die "unknown argument $1 (see --help)" ;;
  esac
done
[ ${#URLS[@]} -gt 0 ] || die "no --engine-url: give the base URL of at least one vLLM server (e.g. http://gpu1:8000)"
[ -n "$JUDGE_URL" ] && [ -n "$JUDGE_NAME" ] || die "--judge-url and --judge-name are required: HH and TruthfulQA \
are scored by an LM judge (an OpenAI-compatible endpoint and the model name it serves)"
[ -z "$LIMIT" ] || [[ "$LIMIT" =~ ^[1-9][0-9]*$ ]] || die "invalid --limit $LIMIT: a positive integer"
[ -z "$BATCH" ] || [[ "$BATCH" =~ ^[1-9][0-9]*$ ]] || die "invalid --batch $BATCH: a positive integer"
[ -z "$SHARD" ] || [[ "$SHARD" =~ ^[0-9]+/[1-9][0-9]*$ ]] || die "invalid --shard $SHARD: i/n, e.g. 0/4"
[ -x "$R" ] || command -v "$R" >/dev/null || die "no rain command at $R (bash scripts/setup.sh, or --rain CMD)"
for task in ${TASKS//,/ }; do
  case "$task" in hh|advbench|truthfulqa|xstest) ;; *) die "unknown task $task (hh, advbench, truthfulqa, xstest)" ;; esac
done

BATCH=${BATCH:-$((16 * ${#URLS[@]}))}
COMMON=(--engine vllm --methods "$METHODS" --batch "$BATCH" --judge-url "$JUDGE_URL" --judge-name "$JUDGE_NAME"
        --judge-key-env "$KEY_ENV" --quiet)
for url in "${URLS[@]}"; do COMMON+=(--engine-url "$url"); done
[ -z "$MODEL" ] || COMMON+=(--model "$MODEL")
[ -z "$LIMIT" ] || COMMON+=(--limit "$LIMIT")
SUFFIX=""
if [ -n "$SHARD" ]; then COMMON+=(--shard "$SHARD"); SUFFIX=".shard-${SHARD%/*}-of-${SHARD#*/}"; fi
case ",$METHODS," in *,best-of-n,*) COMMON+=(--best-of-n match) ;; esac
mkdir -p "$OUT"

run() {  # task, results file stem, then its own flags
  local task=$1 stem=$2; shift 2
  echo "paper.sh: $task -> $OUT/$stem$SUFFIX.jsonl" >&2
  "$R" eval "$task" "${COMMON[@]}" "$@" --out "$OUT/$stem$SUFFIX.jsonl" "${EXTRA[@]}"
}

for task in ${TASKS//,/ }; do
  case "$task" in
    hh) run hh hh --preset paper-hh ;;  # harmless and helpful by the judge, win rates against vanilla
    advbench) for v in ${VARIANTS//,/ }; do run advbench "advbench-$v" --variant "$v" --preset paper-advbench; done ;;
    truthfulqa) run truthfulqa truthfulqa --preset paper-truthfulqa ;;
    xstest) run xstest xstest --preset paper-hh ;;  # string match, and the judge's three classes
  esac
done
"$R" report "$OUT"/*.jsonl --out "$OUT/report"
