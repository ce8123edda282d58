#!/usr/bin/env bash
# Serving benchmark of `heron serve` and, if installed, vLLM's CPU build, on one model,
# one after the other, with ../shared/anchors/bench_serving.py at rates inf, 4 and 1.
#   benchmarks/serving_compare.sh [MODEL_DIR] [NUM_REQUESTS]
# vLLM is looked for in ~/.venvs/vllm-cpu (see ../shared/anchors/README.md).
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL=${1:-$HOME/.cache/heron/models/smollm2-135m-instruct}
NUM=${2:-100}
ANCHORS=${ANCHORS:-../shared/anchors}
VLLM_PY=${VLLM_PY:-$HOME/.venvs/vllm-cpu/bin/python}
CLIENT_PY=${CLIENT_PY:-.venv/bin/python}

wait_healthy() {
  for _ in $(seq 1 300); do
    curl -sf "http://127.0.0.1:$1/health" >/dev/null 2>&1 && return 0
    sleep 1
  done
  echo "server on port $1 did not become healthy" >&2
  return 1
}

run_rates() {  # engine port
  for rate in inf 4 1; do
    printf '%s rate=%s ' "$1" "$rate"
    "$CLIENT_PY" "$ANCHORS/bench_serving.py" --base-url "http://127.0.0.1:$2" --model smollm2 \
      --rate "$rate" --num "$NUM"
  done
}

.venv/bin/heron serve "$MODEL" --served-model-name smollm2 --dtype bfloat16 --max-model-len 2048 \
  --port 8000 --disable-uvicorn-access-log > /tmp/heron-serve.log 2>&1 &
pid=$!
trap 'kill $pid 2>/dev/null || true' EXIT
wait_healthy 8000
run_rates heron 8000
kill $pid; wait $pid 2>/dev/null || true

if [ -x "$VLLM_PY" ]; then
  VLLM_CPU_OMP_THREADS_BIND=0-1 VLLM_CPU_KVCACHE_SPACE=4 "$VLLM_PY" -m vllm.entrypoints.openai.api_server \
    --model "$MODEL" --served-model-name smollm2 --dtype bfloat16 --max-model-len 2048 \
    --host 127.0.0.1 --port 8001 > /tmp/vllm-serve.log 2>&1 &
  pid=$!
  wait_healthy 8001
  run_rates vllm 8001
fi
