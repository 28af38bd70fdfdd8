"""Budget fit vs a hand sweep of n_cpu_moe, on a GPU (issue: memory fit, item 7).

    python benchmarks/fit_bench.py MODEL.gguf --budget 12GiB --out results/fit.json

For each plan (the one `fit` picks under the budget, and `n_cpu_moe(N)` for each N of the sweep): its estimate,
whether it fits, the GPU memory actually allocated (llama.cpp's breakdown) and nvidia-smi's reading, prompt
(512 tokens) and decode (128 tokens, greedy) speed, medians over repetitions, plans interleaved."""

from __future__ import annotations

import argparse
import json
import random
import statistics
import subprocess
import time

import llmplace
from llmplace.memory import breakdown, parse_size
from llmplace.planning import estimate
from llmplace.placement import n_cpu_moe


def nvidia_smi_used_mib() -> int | None:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=10).stdout
        return int(out.split()[0])
    except Exception:  # noqa: BLE001 - no nvidia-smi: report None
        return None


def run_plan(path, kwargs, n_ctx, reps, prompt):
    with llmplace.load(path, progress=False, **kwargs) as model, llmplace.Context(model, n_ctx=n_ctx) as ctx:
        gpu = {k: v.buffers for k, v in breakdown(ctx._ptr).items() if k != "host"}
        smi = nvidia_smi_used_mib()
        pp, tg = [], []
        for _ in range(reps):
            ctx.clear()
            result = llmplace.generate(model, prompt, max_tokens=128, temperature=0, context=ctx)
            pp.append(result.prompt_tps)
            tg.append(result.generation_tps)
    return dict(gpu_bytes=gpu, nvidia_smi_mib=smi, pp512=statistics.median(pp), tg128=statistics.median(tg),
                pp_all=pp, tg_all=tg)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--budget", default="12GiB")
    ap.add_argument("--ctx", type=int, default=4096)
    ap.add_argument("--sweep", default="8,12,16,20,24")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--out")
    args = ap.parse_args()
    gpu = next(d for d in llmplace.devices() if d.kind in ("gpu", "rpc"))  # rpc: a trial run without a GPU
    budget = parse_size(args.budget)
    rng = random.Random(0)
    vocab = llmplace.Model(args.model, vocab_only=True, progress=False)
    prompt = [rng.randrange(1000, vocab.n_vocab - 1) for _ in range(512)]
    vocab.close()

    start = time.perf_counter()
    fitted = llmplace.fit(args.model, budget={gpu.name: budget}, margin=0, n_ctx=args.ctx)
    fit_seconds = time.perf_counter() - start
    plans = {"fit": dict(fitted.load_kwargs())}
    planned = {"fit": fitted.estimate}
    for n in map(int, args.sweep.split(",")):
        plans[f"n_cpu_moe={n}"] = dict(placement=n_cpu_moe(n))
        planned[f"n_cpu_moe={n}"] = estimate(args.model, n_cpu_moe(n), n_ctx=args.ctx)
    rows = {}
    for name, kwargs in plans.items():
        est = planned[name][gpu.name].total if gpu.name in planned[name].memories else 0
        rows[name] = dict(estimate_gpu_bytes=est, fits=est <= budget)
        if not rows[name]["fits"] and name != "fit":
            continue
        rows[name].update(run_plan(args.model, kwargs, args.ctx, args.reps, prompt))
        print(name, json.dumps({k: v for k, v in rows[name].items() if k not in ("pp_all", "tg_all")}), flush=True)
    best = max((r["tg128"] for n, r in rows.items() if n != "fit" and r["fits"] and "tg128" in r), default=None)
    report = dict(model=args.model, device=gpu.description, budget=budget, n_ctx=args.ctx, fit_seconds=fit_seconds,
                  fit_message=fitted.message, fit_success=fitted.success, fit_ot=fitted.to_ot(), rows=rows,
                  fit_vs_best_sweep_tg=(rows["fit"]["tg128"] / best) if best else None)
    print(json.dumps({k: v for k, v in report.items() if k != "rows"}, indent=2))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()
