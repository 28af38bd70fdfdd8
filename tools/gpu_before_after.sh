#!/usr/bin/env bash
# The GPU ratios before and after a change of llmplace's Python code, in one lease, on one CUDA stage: for each
# tree (a folder holding an llmplace/ and a benchmarks/ of that revision, e.g. `git archive REV llmplace
# benchmarks`), the stage's Python files are replaced by the tree's, then `benchmarks/gpu_suite.py` of that
# tree measures the Llama-8B shape all on the GPU against llama-bench, and the drop-in against llama-simple and
# llama-bench (SmolLM2 and Llama-8B shapes). The native part (the stage) is the same for all trees.
#
#   bash tools/gpu_before_after.sh before=.before after=.after     (carry .stage .whl .tok and the trees)
set -euo pipefail
repo=$PWD; out=$(realpath -m "${OUT:-gpu-out}"); mkdir -p "$out"
STEP=build bash tools/gpu_suite.sh >/dev/null   # unpacks the carried stage into /tmp/stage, installs .whl
export PYTHONPATH=/tmp/stage:/tmp/site PYTHONUNBUFFERED=1
tok="$repo/.tok/tiny-llama.gguf"
for shape in smollm2-135m llama-8b; do
    [ -f "/tmp/$shape.gguf" ] || python3 -m llmplace.synthetic "/tmp/$shape.gguf" --shape "$shape" --tokenizer-from "$tok"
done
use_tree() {  # the stage's Python files := the tree's (the compiled module and _build_info.py stay)
    find /tmp/stage/llmplace -name "*.py" -not -name "_build_info.py" -not -path "*/_native/*" -delete
    (cd "$1/llmplace" && find . -name "*.py" -not -path "./_native/*" -exec cp --parents {} /tmp/stage/llmplace/ \;)
}
for what in ${STEPS:-placements dropin}; do
    for pair in "$@"; do
        label=${pair%%=*}; tree=$(realpath "${pair#*=}")
        use_tree "$tree"
        cd /tmp
        if [ "$what" = placements ]; then
            python3 "$tree/benchmarks/gpu_suite.py" placements /tmp/llama-8b.gguf --reps "${REPS:-3}" \
                --out "$out/$label-placements-llama8b.json" | tail -2
        else
            python3 "$tree/benchmarks/gpu_suite.py" dropin /tmp/smollm2-135m.gguf /tmp/llama-8b.gguf \
                --reps "${REPS:-3}" --out "$out/$label-dropin.json" | tail -3
        fi
        cd "$repo"
    done
done
