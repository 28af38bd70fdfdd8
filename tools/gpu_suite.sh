#!/usr/bin/env bash
# The GPU benchmark table and GPU tests, on the lent GPU machine, one step per call (each call has 10 minutes;
# /tmp survives between the calls of one lease). Results go to $OUT (or ./gpu-out).
#
#   STEP=build   build the CUDA stage (or unpack a carried .stage/stage.tar.xz.*), pack it into $OUT (parts under
#                16 MiB, to carry to another machine); every step starts with this
#   STEP=dropin  the drop-in comparison on SmolLM2- and Llama-8B-shaped models
#   STEP=moe     the placement table on the Qwen3-30B-A3B shape (all on GPU, experts on CPU, n_cpu_moe sweep, fit)
#   STEP=tests   tests/test_gpu.py (CPU-vs-GPU agreement on the real SmolLM2 included), the placement table on the
#                Llama-8B shape
#   STEP=images  tests/test_images.py on the GPU (the tiny synthetic vision model: llama-mtmd-cli equality with both
#                on the GPU, the encoder on CUDA0 against the CPU)
#   STEP=batcheq whether a batch's logits equal one-token decodes' here (tools/gpu_batch_equality.py)
#   STEP=overhead  Python work per token on the GPU (benchmarks/overhead.py, real SmolLM2)
#   STEP=spec    speculative decoding on the real SmolLM2 (benchmarks/speculative.py), all on the GPU
#   STEP=trace   the depth controller round by round (tools/spec_trace.py) and what a change of batch size
#                costs (tools/gpu_shape_switch.py), real SmolLM2
#   STEP=split   two GPUs: write the Llama-70B shape, run the split table
#   STEP=cap8b / caphot / capauto / capmoe / cap70b  budgets under a real cap (benchmarks/budget_cap.py: a
#                helper process holds all of the GPU but the budget): Llama-8B Q4_0 and F16 at 4 GiB, hot
#                tensors first, the dense chooser, Qwen3-30B-A3B at 12 GiB with an n_cpu_moe sweep, 70B at 4 GiB
#
# Carry .whl (cffi, pycparser, gguf for cp312), .tok (tiny-llama.gguf, SmolLM2's tokenizer; or .dev), .dev
# (llama.cpp.tar.xz, to build) or .stage (a packed stage). The real SmolLM2 (98 MB) is over one call's carry
# limit: it travels in three thirds, .spec1, .spec2, .spec3, in three calls (STEP_ONLY_COPY=1 for a call that
# only brings files), kept in /tmp. Several steps in one call: STEP="tests dropin".
set -euo pipefail
repo=$PWD; out=$(realpath -m "${OUT:-gpu-out}"); mkdir -p "$out"
. "$repo/tools/gpu_stage.sh"; prepare_stage build pack || exit 1
tok="$repo/.tok/tiny-llama.gguf"; [ -f "$tok" ] || tok="$repo/.dev/tiny-llama.gguf"
for i in 1 2 3; do if [ -d "$repo/.spec$i" ]; then cp "$repo/.spec$i"/smol-part-* /tmp/; fi; done
[ -n "${STEP_ONLY_COPY:-}" ] && exit 0  # a call that only brings files over
synth() {  # synth SHAPE [DTYPE]: write /tmp/SHAPE.gguf (Q4_0) or /tmp/SHAPE-DTYPE.gguf once
    local file="/tmp/$1${2:+-$2}.gguf"
    [ -f "$file" ] || python3 -m llmplace.synthetic "$file" --shape "$1" --dtype "${2:-q4_0}" --tokenizer-from "$tok"
}
real_smollm2() {  # the real SmolLM2, joined from the three thirds carried in earlier calls
    [ -f /tmp/smollm2-real.gguf ] || cat /tmp/smol-part-0 /tmp/smol-part-1 /tmp/smol-part-2 > /tmp/smollm2-real.gguf
}
cd /tmp
for step in ${STEP:?set STEP, e.g. STEP=build or STEP="tests dropin"}; do
case $step in
build) ;;  # the stage above
images)
    LLMPLACE_TEST_TOKENIZER="$tok" python3 -m pytest -q -p no:cacheprovider "$repo/tests/test_images.py" 2>&1 \
        | tee "$out/test_images.txt" || true
    ;;
dropin)
    synth smollm2-135m; synth llama-8b
    python3 "$repo/benchmarks/gpu_suite.py" dropin /tmp/smollm2-135m.gguf /tmp/llama-8b.gguf --reps 5 \
        --out "$out/gpu-dropin.json"
    ;;
tests)
    real_smollm2
    python3 "$repo/tools/gpu_agreement.py" /tmp/smollm2-real.gguf --tokens 128 2>&1 | tee "$out/agreement.txt"
    LLMPLACE_TEST_SMOLLM2=/tmp/smollm2-real.gguf LLMPLACE_TEST_TOKENIZER=$tok \
        python3 -m pytest -q -s -m gpu -p no:cacheprovider "$repo/tests/test_gpu.py" 2>&1 | tee "$out/test_gpu.txt" || true
    synth llama-8b
    python3 "$repo/benchmarks/gpu_suite.py" placements /tmp/llama-8b.gguf --reps 3 --out "$out/gpu-placements-dense.json"
    ;;
moe)
    synth qwen3-30b-a3b
    python3 "$repo/benchmarks/gpu_suite.py" placements /tmp/qwen3-30b-a3b.gguf --reps "${REPS:-2}" \
        --out "$out/gpu-placements-moe.json"
    ;;
batcheq)
    synth smollm2-135m; synth llama-8b
    python3 "$repo/tools/gpu_batch_equality.py" /tmp/smollm2-135m.gguf /tmp/llama-8b.gguf 2>&1 | tee "$out/batch-equality.txt"
    ;;
overhead)
    real_smollm2
    python3 "$repo/benchmarks/overhead.py" /tmp/smollm2-real.gguf --out "$out/gpu-h100-overhead.json"
    ;;
spec)
    real_smollm2
    LLMPLACE_TEST_TOKENIZER=$tok python3 "$repo/benchmarks/speculative.py" /tmp/smollm2-real.gguf --n-gpu-layers 99 \
        --threads 4 --reps "${REPS:-3}" --max-tokens 256 --depth 5 --out "$out/gpu-h100-smollm2-135m-speculative.json"
    ;;
trace)
    real_smollm2
    python3 "$repo/tools/spec_trace.py" /tmp/smollm2-real.gguf --n-gpu-layers 99 \
        --out "$out/gpu-h100-spec-trace-lookup-edit.jsonl" | tail -3
    python3 "$repo/tools/gpu_shape_switch.py" /tmp/smollm2-real.gguf --out "$out/gpu-h100-shape-switch-real.json"
    ;;
cap8b)  # budgets under a real cap (benchmarks/budget_cap.py): the Llama-8B shape at 4 GiB, Q4_0 and F16
    synth llama-8b; synth llama-8b f16
    python3 "$repo/benchmarks/budget_cap.py" /tmp/llama-8b.gguf --budget 4GiB --case fit:ctx=1024 --case fit:mmap=0,ctx=1024 \
        --bench "fitt=-fitt 1024" --out "$out/cap-llama8b-q4_0.json"
    python3 "$repo/benchmarks/budget_cap.py" /tmp/llama-8b-f16.gguf --budget 4GiB --case fit:mmap=0,ctx=1024 \
        --case hot:mmap=0,ctx=1024 --case fit:mmap=1,ctx=1024 --bench "B=-fitt 1024 -lm none" \
        --bench "C=-fitt 1024 -lm none -nopo 1" --out "$out/cap-llama8b-f16.json"
    ;;
caphot)  # hot tensors first against the fit's whole layers, F16 Llama-8B shape at 4 GiB, paired
    synth llama-8b f16
    python3 "$repo/benchmarks/budget_cap.py" /tmp/llama-8b-f16.gguf --budget 4GiB --case hot:mmap=0,ctx=1024 \
        --case fit:mmap=0,ctx=1024 --case hot:mmap=0,ctx=1024 --out "$out/cap-llama8b-f16-hot.json"
    ;;
capauto)  # the dense chooser's plan under the cap (quick)
    synth llama-8b f16
    python3 "$repo/benchmarks/budget_cap.py" /tmp/llama-8b-f16.gguf --budget 4GiB \
        --case fit:mmap=0,ctx=1024,decode=32 --out "$out/cap-llama8b-f16-auto.json"
    ;;
capmoe)  # the Qwen3-30B-A3B shape at 12 GiB, ctx 4096: the fit, an n_cpu_moe sweep, llama-bench -fitt
    # SWEEP: other cases (e.g. repetitions, interleaved); NO_BENCH=1: without llama-bench
    synth qwen3-30b-a3b
    bench_args=(--bench "fitt=-fitt 1024"); [ -n "${NO_BENCH:-}" ] && bench_args=()
    python3 "$repo/benchmarks/budget_cap.py" /tmp/qwen3-30b-a3b.gguf --budget 12GiB --case fit \
        ${SWEEP:---case ncmoe=14 --case ncmoe=16 --case ncmoe=18 --case ncmoe=20} \
        "${bench_args[@]}" --out "$out/cap-qwen3-30b-a3b-q4_0${TAG:-}.json"
    ;;
cap70b)  # "70B on 4 GiB" under the cap, and the host's memory bandwidth (its decode's physical limit)
    rm -f /tmp/qwen3-30b-a3b.gguf  # the disk holds one of the two
    synth llama-70b
    python3 -c "import torch, time; a = torch.ones(2**31, dtype=torch.float32); a.sum(); t = time.perf_counter(); [a.sum() for _ in range(5)]; print('host read bandwidth GB/s', round(5 * a.numel() * 4 / (time.perf_counter() - t) / 1e9, 1), 'threads', torch.get_num_threads())" | tee "$out/host-bandwidth.txt"
    python3 "$repo/benchmarks/budget_cap.py" /tmp/llama-70b.gguf --budget 4GiB --case fit:mmap=0,ctx=1024,decode=32 \
        --out "$out/cap-llama70b-q4_0.json"
    ;;
split)
    synth llama-70b
    nvidia-smi --query-gpu=name,memory.total --format=csv
    python3 "$repo/benchmarks/gpu_suite.py" split /tmp/llama-70b.gguf --reps "${REPS:-2}" --out "$out/gpu-split.json"
    ;;
esac
done
