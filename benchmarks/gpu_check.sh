#!/usr/bin/env bash
# The GPU check of the cuda platform, for a lent GPU machine, in one call (about 5-7 min):
# kernel tests on the GPU, greedy equivalence with Hugging Face, an attention
# micro-benchmark against the card's copy bandwidth, offline-64 throughput against
# HF generate; a markdown table at the end (benchmarks/gpu_check.py says more).
#
# The workloads live beside the checkout (../shared/anchors), which does not travel:
# copy them into the tree first (.anchors is git-ignored through .git/info/exclude):
#   cp -r ../shared/anchors .anchors && echo /.anchors/ >> .git/info/exclude
# then, with the device tool:
#   run(command="bash benchmarks/gpu_check.sh", carry=[".anchors"], timeout_s=600)
# Rehearsal on a machine without a GPU (CPU, Triton interpreter, tiny sizes):
#   HERON_GPU_CHECK_SKIP_INSTALL=1 PYTHON=.venv/bin/python bash benchmarks/gpu_check.sh --dry-run
#
# The GPU machine has torch, triton, transformers, tokenizers, safetensors, pluggy,
# numpy, jinja2, tqdm and pytest, and no network. heron installs from the working
# tree without its dependencies (the server's fastapi/uvicorn are not needed
# offline) and without build isolation (setuptools is there), so torch is never
# touched. Wheels for anything missing can travel in .whl/ (carry=[".whl"]).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT=${OUT:-/tmp/heron_gpu_check}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1

if [ -z "${HERON_GPU_CHECK_SKIP_INSTALL:-}" ]; then
    if compgen -G ".whl/*.whl" > /dev/null; then
        "$PY" -m pip install -q --no-index --no-deps --no-cache-dir .whl/*.whl
    fi
    # editable, so that the entry points (the platform plugins) are registered
    "$PY" -m pip install -q --no-index --no-deps --no-build-isolation -e . 2>&1 | tail -3 \
        || "$PY" -m pip install -q --no-index --no-deps --no-build-isolation . 2>&1 | tail -3
fi
"$PY" - <<'PYEOF'
import importlib.metadata as md
import importlib.util
missing = [m for m in ("torch", "triton", "transformers", "tokenizers", "safetensors", "pluggy",
                       "numpy", "jinja2", "tqdm", "pytest") if importlib.util.find_spec(m) is None]
eps = [e.name for e in md.entry_points(group="heron")]
print("heron", md.version("heron"), "platform plugins:", ", ".join(sorted(eps)))
if missing or "cuda" not in eps:
    raise SystemExit(f"cannot run: missing {missing or 'the heron entry points'}; carry wheels in .whl/")
PYEOF
"$PY" benchmarks/gpu_check.py --out "$OUT" "$@" 2>&1 | tee "$OUT/gpu_check.log"
