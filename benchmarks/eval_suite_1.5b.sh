#!/usr/bin/env bash
# RAIN on a model that can (barely) judge itself: Qwen2.5-Coder-1.5B-Instruct (`rain models fetch
# qwen2.5-coder-1.5b`, about 1 GB), the experiments behind README's section on it. Resumable: rerun
# to finish; long on a 2-core CPU (hours). bfloat16 (4x faster here than float32; the self-evaluation
# screen agreed with float32 to 0.003 AUC) and the `short` self-evaluation template in mean mode
# (its vote ties on most pairs; the signal is in the probabilities).
set -euo pipefail
cd "$(dirname "$0")/.."
R=.venv/bin/rain
OUT=results/eval/qwen1.5b
mkdir -p $OUT
M=(--model qwen2.5-coder-1.5b --dtype bfloat16 --quiet)
T=(--template results/eval/templates/short.toml --value-mode mean)
N=${N:-30}
# paper-advbench's temperature 2 at a budget this CPU can afford (the fast preset: T_max 8, 4 candidates)
ADV=(--preset fast --temperature 2.0 --max-new-tokens 24 --batch "${BATCH:-4}")
# pre-flight: can it judge harmlessness at all? (float32; the built-in template and the short one)
$R eval selfeval --model qwen2.5-coder-1.5b --dtype float32 --limit 200 --quiet --out $OUT/selfeval-builtin.jsonl
$R eval selfeval --model qwen2.5-coder-1.5b --dtype float32 --limit 200 --quiet "${T[@]}" --out $OUT/selfeval-short.jsonl
# AdvBench goals without a suffix, and with SmoothLLM's GCG suffixes: attack success by llm-attacks' rule
$R eval advbench --limit "${N_PLAIN:-50}" --methods vanilla,rain,best-of-n --best-of-n match "${M[@]}" "${T[@]}" \
  "${ADV[@]}" --out $OUT/advbench.jsonl
# (SmoothLLM has 20 goals with suffixes; JailbreakBench's GCG artifacts, optimised on Vicuna-13B, have 100)
$R eval advbench --variant smoothllm --limit "$N" --methods vanilla,rain,best-of-n --best-of-n match "${M[@]}" "${T[@]}" \
  "${ADV[@]}" --out $OUT/advbench-gcg.jsonl
$R eval advbench --variant jbb-vicuna --limit "${N_JBB:-50}" --methods vanilla,rain,best-of-n --best-of-n match "${M[@]}" \
  "${T[@]}" "${ADV[@]}" --out $OUT/advbench-jbb-vicuna.jsonl
# XSTest: over-refusal on safe prompts, compliance on unsafe ones (string match)
for shard in 0/9 1/9; do  # every 9th prompt, twice: 56 safe, 44 unsafe
  $R eval xstest --shard $shard --limit 50 --methods vanilla,rain "${M[@]}" "${T[@]}" --preset fast --max-new-tokens 24 \
    --batch "${BATCH:-4}" --out $OUT/xstest.jsonl
done
$R report $OUT/*.jsonl --out $OUT/report
