#!/usr/bin/env bash
# The serving benchmark on the lent GPU machine (issue 20): `llmplace serve` against llama.cpp's llama-server,
# built from the same pinned source, side by side in one run, with the same model, slots and context per slot;
# llama-batched-bench at the same parallel counts as the engine's ceiling. Load: benchmarks/serve_load.py
# (127.0.0.1 only, bounded), streaming /v1/completions, the same prompts and max_tokens against both servers.
# Writes $OUT/serve-gpu.json (or ./gpu-out; rewritten after each model) and the logs.
#
# Carry .stage (a packed CUDA stage, see tools/gpu_suite.sh), .dev (llama.cpp.tar.xz: the source of the server
# tools), .whl (cffi, pycparser, gguf for cp312), .tok (tiny-llama.gguf: SmolLM2's tokenizer for the synthetic
# models). Settings: MODELS (default "smollm2-135m llama-8b", shapes of llmplace.synthetic, Q4_0), SLOTS (32),
# N_CTX (tokens per slot, 1024), CLIENTS (1,4,8,32), MAX_TOKENS (128), FLASH_ATTN (on: both servers and
# batched-bench alike), DURATION (seconds each client level sends requests, 40).
#
# The server tools are built without CUDA (a minute, not the stage's four): ggml's backends are modules loaded at
# run time, so llama-server and llama-batched-bench are copied beside the stage's libraries and load the same
# libllmplace-*.so and CUDA module that llmplace itself runs on.
set -euo pipefail
repo=$PWD; out=$(realpath -m "${OUT:-gpu-out}"); mkdir -p "$out"
MODELS=${MODELS:-"smollm2-135m llama-8b"}; SLOTS=${SLOTS:-32}; N_CTX=${N_CTX:-1024}; CLIENTS=${CLIENTS:-1,4,8,32}
MAX_TOKENS=${MAX_TOKENS:-128}; FLASH_ATTN=${FLASH_ATTN:-on}; DURATION=${DURATION:-40}
. "$repo/tools/gpu_stage.sh"; prepare_stage || exit 1
lib=/tmp/stage/llmplace/lib
if [ ! -x "$lib/llama-server" ]; then
    if [ ! -d vendor/llama.cpp ]; then
        [ -f .dev/llama.cpp.tar.xz ] || { echo "carry .dev (llama.cpp.tar.xz)"; exit 1; }
        mkdir -p vendor && tar xJf .dev/llama.cpp.tar.xz -C vendor
    fi
    start=$SECONDS
    # system compilers, as tools/build_cuda_stage.sh says why
    CC=/usr/bin/gcc CXX=/usr/bin/g++ cmake -S . -B /tmp/bserve -G Ninja -DCMAKE_BUILD_TYPE=Release \
        -DLLMPLACE_BUILD_SERVER_TOOLS=ON -DLLMPLACE_BUILD_REFERENCE_TOOLS=OFF \
        -DPython_EXECUTABLE="$(command -v python3)" > "$out/build-server-tools.log" 2>&1 \
        && cmake --build /tmp/bserve -j"$(nproc)" --target llama-server llama-batched-bench \
        >> "$out/build-server-tools.log" 2>&1 || { tail -40 "$out/build-server-tools.log"; exit 1; }
    cp /tmp/bserve/bin/llama-server /tmp/bserve/bin/llama-batched-bench /tmp/bserve/bin/libllmplace-mtmd.so \
       /tmp/bserve/bin/libllmplace-llama-server-impl.so /tmp/bserve/bin/libllmplace-llama-batched-bench-impl.so "$lib/"
    echo "server tools built in $((SECONDS - start)) s"
fi
tok="$repo/.tok/tiny-llama.gguf"
fa_bool=$([ "$FLASH_ATTN" = on ] && echo True || echo False)

wait_ready() {  # wait_ready PORT PID NAME: until GET /health answers 200 (llama-server: 503 while loading)
    python3 "$repo/benchmarks/serve_load.py" --url "http://127.0.0.1:$1" --wait-ready /health --server-pid "$2" \
        --note "$3"
}
load() {  # load PORT NAME MODEL: a warm-up level, then the measured levels, into /tmp/raw-MODEL-NAME.json
    python3 "$repo/benchmarks/serve_load.py" --url "http://127.0.0.1:$1" --clients 8 --requests 8 --max-tokens 16 \
        --ban-tokens 0,2 > /dev/null 2>&1 || true
    # a level stops sending after DURATION s (what was sent finishes): the whole run stays inside one 10-minute call
    python3 "$repo/benchmarks/serve_load.py" --url "http://127.0.0.1:$1" --clients "$CLIENTS" --duration "$DURATION" \
        ${REQUESTS:+--requests "$REQUESTS"} --timeout 60 --max-tokens "$MAX_TOKENS" --ban-tokens 0,2 \
        --note "$2 $3, $SLOTS slots x $N_CTX tokens, flash_attn $FLASH_ATTN" --out "/tmp/raw-$3-$2.json" > /dev/null \
        || echo "serve_load against $2 failed"
}
stop() { kill "$1" 2>/dev/null || true; wait "$1" 2>/dev/null || true; }
combine() {  # one JSON of the models so far: batched-bench's rows, both servers' levels, llmplace / llama-server
    python3 - "$out/serve-gpu.json" <<EOF
import json, os, sys
report = {"gpu": open("/tmp/gpu.txt").read().strip(), "slots": $SLOTS, "n_ctx_per_slot": $N_CTX,
          "max_tokens": $MAX_TOKENS, "flash_attn": "$FLASH_ATTN", "clients": "$CLIENTS",
          "batched_bench_prompt_tokens": 16, "models": {}}
for shape in "$MODELS".split():
    entry = {"model": f"{shape} (llmplace.synthetic, Q4_0)", "batched_bench": [], "servers": {}}
    path = f"/tmp/raw-{shape}-batched.txt"
    if os.path.exists(path):
        entry["batched_bench"] = [json.loads(line) for line in open(path) if line.startswith('{"n_kv_max"')]
    for name in ("llama-server", "llmplace"):
        path = f"/tmp/raw-{shape}-{name}.json"
        if os.path.exists(path):
            entry["servers"][name] = json.load(open(path))["servers"][0]["levels"]
    if not entry["batched_bench"] and not entry["servers"]:
        continue
    ours, theirs = entry["servers"].get("llmplace", []), entry["servers"].get("llama-server", [])
    entry["ratios_llmplace_over_llama_server"] = [
        {"clients": a["clients"],
         "tokens_per_s": round(a["tokens_per_s"] / b["tokens_per_s"], 3) if b["tokens_per_s"] else None,
         "itl_p99": round(a["itl_ms"]["p99"] / b["itl_ms"]["p99"], 3) if a["itl_ms"]["p99"] and b["itl_ms"]["p99"] else None,
         "ttft_p50": round(a["ttft_ms"]["p50"] / b["ttft_ms"]["p50"], 3) if a["ttft_ms"]["p50"] and b["ttft_ms"]["p50"] else None}
        for a, b in zip(ours, theirs)]
    report["models"][shape] = entry
    print(shape, "batched-bench S_TG:", [(r["pl"], round(r["speed_tg"])) for r in entry["batched_bench"]])
    for name, levels in entry["servers"].items():
        print(shape, name, [(l["clients"], l["tokens_per_s"], l["ttft_ms"], l["itl_ms"], l["errors"]) for l in levels])
    print(shape, "ratios", entry["ratios_llmplace_over_llama_server"])
open(sys.argv[1], "w").write(json.dumps(report, indent=1) + "\n")
EOF
    tail -c 20000 /tmp/llama-server-*.log > "$out/servers.log" 2>/dev/null || true
    tail -c 5000 /tmp/llmplace-serve-*.log >> "$out/servers.log" 2>/dev/null || true
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee /tmp/gpu.txt
for shape in $MODELS; do
    model=/tmp/$shape.gguf
    start=$SECONDS
    [ -f "$model" ] || python3 -m llmplace.synthetic "$model" --shape "$shape" --dtype q4_0 --tokenizer-from "$tok"
    echo "$shape written in $((SECONDS - start)) s"
    # the ceiling: llama.cpp's batched decode alone, prompts as short as the load's, MAX_TOKENS generated each
    (cd "$lib" && ./llama-batched-bench -m "$model" -c $((SLOTS * N_CTX)) -b 2048 -ub 512 -ngl 99 -fa "$FLASH_ATTN" \
        -npp 16 -ntg "$MAX_TOKENS" -npl "$CLIENTS" --output-format jsonl) > "/tmp/raw-$shape-batched.txt" 2>&1 \
        || tail -20 "/tmp/raw-$shape-batched.txt"
    # llama-server: SLOTS slots sharing a context of SLOTS x N_CTX (N_CTX per slot, as llmplace's)
    port=18080
    (cd "$lib" && exec ./llama-server -m "$model" --host 127.0.0.1 --port $port -np "$SLOTS" -c $((SLOTS * N_CTX)) \
        -ngl 99 -fa "$FLASH_ATTN" --no-webui) > "/tmp/llama-server-$shape.log" 2>&1 &
    pid=$!
    if wait_ready $port $pid llama-server; then load $port llama-server "$shape"; else tail -30 "/tmp/llama-server-$shape.log"; fi
    stop $pid
    # llmplace serve: the same slots of N_CTX tokens, the same flash attention setting, exact=False (what
    # `--exact-batching auto` picks when a GPU holds the weights), through serve()'s engine_options
    port=18081
    # from /tmp: run from the checkout, python3 -c would import its llmplace/ (no compiled module) before the stage's
    (cd /tmp && exec python3 -c "
import sys
from llmplace.server import serve
serve(sys.argv[1], host='127.0.0.1', port=int(sys.argv[2]), n_ctx=int(sys.argv[3]), n_gpu_layers=-1, flash_attn=$fa_bool,
      server_options=dict(slots=int(sys.argv[4]), engine_options=dict(flash_attn=$fa_bool, exact=False)))
" "$model" $port "$N_CTX" "$SLOTS") > "/tmp/llmplace-serve-$shape.log" 2>&1 &
    pid=$!
    if wait_ready $port $pid llmplace; then load $port llmplace "$shape"; else tail -30 "/tmp/llmplace-serve-$shape.log"; fi
    stop $pid
    combine
done
