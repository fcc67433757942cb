#!/usr/bin/env bash
# benchmarks/paper.sh small, on this machine: the default model on a CPU vLLM server (.venv-vllm, from
# scripts/setup_vllm.sh; README "Scaling out"), the policy itself as the LM judge through that server's
# OpenAI endpoint, 2 prompts per task as two shards of 1, a budget a CPU affords. tests/test_paper.py
# runs the same in CI. Writes OUT (default results/paper/dryrun-cpu); the server stops at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-results/paper/dryrun-cpu}
PORT=${PORT:-18321}
FOLDER=$(.venv/bin/python -c "from rain_llm.engine.hf.models import converted_folder, default_gguf; \
print(converted_folder(default_gguf()))")
mkdir -p "$OUT"
LOG=$(mktemp /tmp/paper-dryrun-vllm.XXXXXX.log)
HF_HUB_OFFLINE=1 setsid .venv-vllm/bin/python -m vllm.entrypoints.openai.api_server --model "$FOLDER" \
  --served-model-name smol --host 127.0.0.1 --port "$PORT" --enforce-eager --dtype float32 --max-model-len 2048 \
  --kv-cache-memory-bytes 1G --block-size 32 --max-logprobs 20 --enable-prompt-tokens-details \
  --generation-config vllm > "$LOG" 2>&1 &
SERVER=$!
trap 'kill -TERM -- -$SERVER 2>/dev/null || true' EXIT
for _ in $(seq 600); do  # at most 5 minutes
  curl -sf "http://127.0.0.1:$PORT/health" >/dev/null && break
  kill -0 $SERVER 2>/dev/null || { echo "paper_dryrun: the vLLM server exited: see $LOG" >&2; exit 1; }
  sleep 0.5
done
curl -sf "http://127.0.0.1:$PORT/health" >/dev/null || { echo "paper_dryrun: no healthy server in 5 min" >&2; exit 1; }
URL=http://127.0.0.1:$PORT
for shard in 0/2 1/2; do
  bash benchmarks/paper.sh --engine-url $URL --judge-url $URL/v1 --judge-name smol --variants smoothllm --limit 1 \
    --batch 2 --shard $shard --out "$OUT" -- --max-new-tokens 6 --t-max 2 --t-min 1 --fresh-iterations 1 \
    --token-set-lengths 1,2 --max-rollout-tokens 8
done
