#!/usr/bin/env bash
# On a GPU machine with the project installed (pip install -e '.[vllm,dev]'): the GPU tests (the
# engine contract, what vLLM serves beyond it, a whole job through vLLM on a GPU worker), the
# engine benchmark, and vLLM offline against our system on the GPU (bench/vllm_bench.py with
# configs/vllm-gpu.yaml), on the bundled tiny model and, when given, on a local model folder.
#   bench/gpu_check.sh [MODEL_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
for model in tiny-llama ${1:-}; do
  echo "== GPU tests on $model"
  INFERENCE_GPU_MODEL=$model $PY -m pytest -q -rs tests/gpu
done
echo "== engine benchmark (tiny-llama)"
$PY bench/engine_bench.py --items "${BENCH_ITEMS:-10000}" --workers 1 --device cuda \
  ${1:+--model "$1"}
echo "== vLLM offline vs the system, on the GPU (tiny-llama)"
$PY bench/vllm_bench.py --config configs/vllm-gpu.yaml --items "${BENCH_ITEMS:-10000}" \
  --skip-transformers
