#!/usr/bin/env bash
# On the GPU machine: "70B on a 4 GB GPU". Builds /tmp/stage if missing, writes a random-weight Llama-70B-shaped
# Q4_0 model, then runs benchmarks/big_on_small.py with a 4 GiB budget (mmap'd, then pinned with MODES).
set -euo pipefail
repo=$PWD; out=$(realpath -m "${OUT:-gpu-out}"); mkdir -p "$out"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/stage:/tmp/site
[ -f /tmp/stage/llmplace/_build_info.py ] || tools/build_cuda_stage.sh /tmp/b /tmp/stage "${CUDA_ARCH:-90}" > "$out/build.log" 2>&1 \
    || { tail -40 "$out/build.log"; exit 1; }
(cd "$repo/llmplace" && find . -name "*.py" -not -path "./_native/*" -exec cp --parents {} /tmp/stage/llmplace/ \;)
cd /tmp
model=/tmp/llama-70b-q4_0-random.gguf
[ -f $model ] || { time python3 -m llmplace.synthetic $model --shape llama-70b --dtype q4_0 \
    --tokenizer-from "$repo/.dev/tiny-llama.gguf"; }
for mode in ${MODES:-mmap}; do
  flag=""; [ "$mode" = pinned ] && flag="--no-mmap"
  python3 "$repo/benchmarks/big_on_small.py" $model --budget "${BUDGET:-4GiB}" $flag \
      --out "$out/big-on-small-h100-llama70b-q4_0-$mode.json"
done
