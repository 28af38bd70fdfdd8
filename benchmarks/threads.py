"""How fast SmolLM2 generates with 1, 2, ... threads, on an idle-ish machine and on one kept busy, to choose
`llmplace.context.default_threads()` (issue 19: all cores collapsed on a loaded 2-core machine).

    python benchmarks/threads.py [MODEL.gguf] [--threads 1,2] [--busy 4] [--tokens 64] [--reps 3] [--out FILE.json]

For each condition ("idle": whatever else runs on the machine; "busy": BUSY extra processes spinning in a
Python loop, like a build or another engineer's tests) and each thread count, one Context generates TOKENS
tokens greedily from a ~100-token prompt REPS times (the prompt is cleared each time, so it is recomputed);
the JSON keeps every run's prompt and generation tok/s, the medians and the load average seen.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import statistics
import time
from datetime import datetime, timezone
from pathlib import Path

PROMPT = ("The lighthouse keeper climbed the stairs every evening at dusk. The sea below was grey and restless, "
          "the wind carried salt and rain, and the lamp waited for him at the top of the tower. That night, "
          "as he looked down at the rocks, he saw a green bottle caught between two stones, and inside it")


def _spin() -> None:
    while True:
        pass


def _measure(model, n_threads: int, tokens: int, reps: int) -> dict:
    import llmplace

    runs = []
    # the end-of-text token is banned so every run generates exactly `tokens` tokens
    no_end = {t: -100.0 for t in {model.vocab.eos, model.vocab.eot} if t is not None}
    with llmplace.Context(model, n_ctx=512, n_threads=n_threads) as ctx:
        llmplace.generate(model, PROMPT, max_tokens=4, temperature=0, context=ctx)  # warm-up: pools, caches
        for _ in range(reps):
            ctx.clear()
            started = time.perf_counter()
            r = llmplace.generate(model, PROMPT, max_tokens=tokens, temperature=0, context=ctx,
                                  logit_bias=no_end)
            runs.append({"prompt_tps": round(r.prompt_tps, 1), "generation_tps": round(r.generation_tps, 1),
                         "generated": len(r.tokens), "wall_s": round(time.perf_counter() - started, 3)})
    return {"n_threads": n_threads, "runs": runs,
            "median_generation_tps": round(statistics.median(r["generation_tps"] for r in runs), 1),
            "median_prompt_tps": round(statistics.median(r["prompt_tps"] for r in runs), 1)}


def main() -> None:
    import llmplace
    from llmplace.demo_model import locate

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", nargs="?", help="GGUF file (default: the embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--threads", default="1,2", help="comma-separated thread counts to compare")
    parser.add_argument("--busy", type=int, default=4, help="spinning processes in the busy condition")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    model_path = args.model or str(locate())
    counts = [int(t) for t in args.threads.split(",")]

    conditions = []
    with llmplace.load(model_path) as model:
        for name, busy in (("idle", 0), ("busy", args.busy)):
            spinners = [multiprocessing.Process(target=_spin, daemon=True) for _ in range(busy)]
            for p in spinners:
                p.start()
            try:
                time.sleep(1.0 if busy else 0.0)
                load_before = os.getloadavg()[0]
                chosen = llmplace.context.default_threads()  # what a Context made now would use
                results = [_measure(model, n, args.tokens, args.reps) for n in counts]
                conditions.append({"condition": name, "spinning_processes": busy,
                                   "loadavg_1min_before": round(load_before, 2),
                                   "default_threads": chosen,
                                   "loadavg_1min_after": round(os.getloadavg()[0], 2), "results": results})
            finally:
                for p in spinners:
                    p.terminate()
                for p in spinners:
                    p.join()
            for r in results:
                print(f"{name:5} n_threads={r['n_threads']}: generate {r['median_generation_tps']:7.1f} tok/s, "
                      f"prompt {r['median_prompt_tps']:7.1f} tok/s  (load {load_before:.1f})", flush=True)

    report = {"benchmark": "threads", "model": Path(model_path).name, "tokens": args.tokens, "reps": args.reps,
              "logical_cpus": os.cpu_count(), "affinity_cpus": len(os.sched_getaffinity(0)),
              "machine": platform.machine(),
              "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "conditions": conditions}
    if args.out:
        args.out.write_text(json.dumps(report, indent=1) + "\n")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
