#!/usr/bin/env bash
# On the GPU machine, after tools/gpu_placement_check.sh built /tmp/stage: write a random-weight
# Qwen3-30B-A3B-shaped Q4_0 model and compare the plan `fit` picks under a 12 GiB budget with a hand sweep
# of n_cpu_moe (benchmarks/fit_bench.py). Results go to $OUT (or ./gpu-out).
set -euo pipefail
repo=$PWD; out=$(realpath -m "${OUT:-gpu-out}"); mkdir -p "$out"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/stage:/tmp/site
(cd "$repo/llmplace" && find . -name "*.py" -not -path "./_native/*" -exec cp --parents {} /tmp/stage/llmplace/ \;)
cd /tmp
model=/tmp/qwen3-30b-a3b-q4_0-random.gguf
[ -f $model ] || python3 -m llmplace.synthetic $model --shape qwen3-30b-a3b --dtype q4_0 \
    --tokenizer-from "$repo/.dev/tiny-llama.gguf"
python3 "$repo/benchmarks/fit_bench.py" $model --budget "${BUDGET:-12GiB}" --ctx 4096 --sweep "${SWEEP:-12,16,20,24}" \
    --reps 3 --out "$out/fit-h100-qwen3-30b-a3b-q4_0.json"
