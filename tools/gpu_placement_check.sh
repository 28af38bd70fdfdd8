#!/usr/bin/env bash
# On the lent GPU machine (see the device tool): build the CUDA stage, then run the GPU placement tests and
# `llmplace explain` on a full-size (sparse) Qwen3-30B-A3B-shaped model. Results go to $OUT (or ./gpu-out).
# Needs .whl (cffi, pycparser, gguf for cp312) and .dev (llama.cpp.tar.xz, tiny-llama.gguf) carried over.
set -uo pipefail
repo=$PWD; out=$(realpath -m "${OUT:-gpu-out}"); mkdir -p "$out"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/stage:/tmp/site LLMPLACE_TEST_TOKENIZER=$PWD/.dev/tiny-llama.gguf
[ -f /tmp/stage/llmplace/_build_info.py ] || tools/build_cuda_stage.sh /tmp/b /tmp/stage "${CUDA_ARCH:-90}" > "$out/build.log" 2>&1 \
    || { tail -40 "$out/build.log"; exit 1; }
(cd "$repo/llmplace" && find . -name "*.py" -not -path "./_native/*" -exec cp --parents {} /tmp/stage/llmplace/ \;)
# Python runs from /tmp: run from the repo root, the source folder (without the compiled parts) would
# shadow the staged package.
cd /tmp
model=/tmp/qwen3-30b-a3b-q4_0.gguf
[ -f $model ] || python3 -m llmplace.synthetic $model --shape qwen3-30b-a3b --dtype q4_0 --sparse \
    --tokenizer-from "$repo/.dev/tiny-llama.gguf"
set -f  # the rules below hold glob characters
{
  echo '$ llmplace devices'; python3 -m llmplace.cli devices
  for args in "" "--rule exps=cpu" "--n-cpu-moe 16" "--rule blk\.(1[0-9]|[2-4][0-9])\.ffn_.*_exps=cpu" "--distribute"; do
    echo; echo "\$ llmplace explain qwen3-30b-a3b-q4_0.gguf $args"
    python3 -m llmplace.cli explain $model $args
  done
  for budget in 24GiB 12GiB 4GiB; do
    echo; echo "\$ llmplace fit qwen3-30b-a3b-q4_0.gguf --budget CUDA0=$budget --ctx 4096 --margin 0"
    python3 -m llmplace.cli fit $model --budget CUDA0=$budget --ctx 4096 --margin 0
  done
} > "$out/explain.txt" 2>&1
cat "$out/explain.txt"
python3 -m pytest -q -s -m gpu -p no:cacheprovider "$repo/tests/test_gpu.py" 2>&1 | tee "$out/test_gpu.txt" | tail -30
