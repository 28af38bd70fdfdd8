"""The GPU benchmark table: llmplace against llama.cpp's own tools built from the same source, in the same run,
as ratios. One command per machine (tools/gpu_suite.sh writes the random-weight models and runs these):

    python benchmarks/gpu_suite.py placements llama-8b.gguf qwen3-30b-a3b.gguf --out gpu-placements.json
    python benchmarks/gpu_suite.py dropin smollm2-135m.gguf llama-8b.gguf --out gpu-dropin.json
    python benchmarks/gpu_suite.py split llama-70b.gguf --out gpu-split.json          (two GPUs)

placements: for each placement of each model (all on the GPU; for MoE models also experts on the CPU, an
    n_cpu_moe sweep and what `llmplace.fit` picks under --budget), llama-bench and llmplace run interleaved rep
    by rep on the same placement (the same -ot string, or -ncmoe, or the fit's layers and overrides): prefill of
    512 tokens and decode of 128, ratio of the medians (bench.py's measurement).
dropin: llmplace.Llama's create_completion (and its stream) greedy, 256 tokens, against the tight C loop of
    llama.cpp's `llama-simple` (llama_decode + a greedy sampler chain + token to text) and llama-bench tg256.
split: tensor_split 1:1 and 2:1 in layer and tensor split mode: per-device weight bytes (llama.cpp's memory
    breakdown) against the ratio asked for, and throughput against llama-bench with the same -sm/-ts.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import llmplace
from llmplace._ffi import BIN_DIR, LIB_DIR
from llmplace.context import default_threads
from llmplace import gguf_info
from llmplace.memory import breakdown, parse_size
from llmplace.planning import estimate
from llmplace.placement import n_cpu_moe

sys.path.insert(0, str(Path(__file__).parent))
from bench import PAIRS, llama_bench, llmplace_run, summarize, write_result  # noqa: E402


def gpu_devices() -> list:
    gpus = [d for d in llmplace.devices() if d.kind == "gpu"]
    if not gpus:
        raise SystemExit("no GPU device: install the CUDA plugin (or build the CUDA stage)")
    return gpus


def gpu_free() -> dict[str, int]:
    return {d.name: d.memory_free for d in gpu_devices()}


def machine() -> dict:
    return {"devices": [f"{d.name}: {d.description}" for d in llmplace.devices()], "threads": default_threads()}


def compare(path: Path, label: str, load_kwargs: dict, bench_args: list[str], ngl: int, reps: int,
            threads: int, extra: dict | None = None) -> dict:
    """Interleaved reps of llama-bench and llmplace on one placement; medians, ratios, per-device bytes."""
    ref_runs, our_runs = [], []
    free_before = gpu_free()
    with llmplace.load(path, progress=False, **load_kwargs) as model:
        with llmplace.Context(model, n_ctx=1024, flash_attn=True) as ctx:
            memory = {name: {"weights": use.weights, "kv": use.kv, "compute": use.compute}
                      for name, use in breakdown(ctx._ptr).items()}
            # what each GPU lost: in tensor split mode llama.cpp's breakdown has one "Meta" device for all
            used = {name: free_before[name] - free for name, free in gpu_free().items()}
        for _ in range(reps):
            ref_runs.append(llama_bench(path, threads, 1, ngl, bench_args))
            our_runs.append(llmplace_run(model, threads, True))
    ref, ours, ratios, paired = summarize(ref_runs, our_runs)
    row = {"placement": label, "llama_bench_args": ["-ngl", str(ngl), *bench_args], "memory": memory,
           "gpu_bytes_used": used,
           "llama_bench_tps": ref, "llmplace_tps": ours, "ratio": ratios, "paired_ratio_median": paired,
           "runs": {"llama_bench": ref_runs, "llmplace": our_runs}, **(extra or {})}
    print(f"{path.name:<28} {label:<22} " + "  ".join(
        f"{k} {ours[k]:8.1f} / {ref[rk]:8.1f} = {ratios[k]:.3f}" for k, rk in PAIRS), flush=True)
    return row


def ot_targets(ot: str) -> str:
    """llmplace's -ot string as llama-bench takes it: buffer type names ("CPU", not "cpu"), and overrides
    separated by ";" (llama-bench reads "," as a list of separate test configurations)."""
    return ";".join(f"{pattern}={'CPU' if to.lower() in ('cpu', 'host') else to}"
                    for pattern, _, to in (item.rpartition("=") for item in ot.split(",") if item))


def placements(args) -> dict:
    gpu = gpu_devices()[0]
    rows = []
    for path in map(Path, args.models):
        is_moe = any("_exps" in t.name for t in gguf_info.read(path).tensors)
        configs: list[tuple[str, dict, list[str], int, dict]] = [("all on GPU", {}, [], 99, {})]
        if is_moe:
            configs.append(("experts on CPU", {"placement": "exps=CPU"}, ["-ot", "exps=CPU"], 99, {}))
            for n in map(int, args.sweep.split(",")):
                configs.append((f"n_cpu_moe={n}", {"placement": n_cpu_moe(n)}, ["-ncmoe", str(n)], 99, {}))
            start = time.perf_counter()
            fitted = llmplace.fit(path, budget={gpu.name: args.budget}, margin=0, n_ctx=4096)
            seconds = time.perf_counter() - start
            ot = ot_targets(fitted.to_ot())
            ngl = fitted.n_gpu_layers if fitted.n_gpu_layers >= 0 else 99
            configs.append((f"fit {args.budget}", fitted.load_kwargs(), ["-ot", ot] if ot else [], ngl,
                            {"fit_seconds": seconds, "fit_message": fitted.message, "fit_ot": ot,
                             "fit_estimate_gpu_bytes": fitted.estimate[gpu.name].buffers}))
        for label, load_kwargs, bench_args, ngl, extra in configs:
            row = compare(path, label, load_kwargs, bench_args, ngl, args.reps, args.threads, extra)
            rows.append({"model": path.name, "model_path": str(path), **row})
    # fit against the best sweep point that fits the same budget with the same context (estimated, as fit does)
    budget = parse_size(args.budget)
    fit_rows = [r for r in rows if r["placement"].startswith("fit")]
    fitting = [r for r in rows if r["placement"].startswith("n_cpu_moe")
               and estimate(r["model_path"], n_cpu_moe(int(r["placement"].split("=")[1])), n_ctx=4096)[gpu.name].total
               <= budget]
    summary = {}
    if fit_rows and fitting:
        best = max(fitting, key=lambda r: r["llmplace_tps"]["tg128_generate"])
        summary = {"fit_vs_best_fitting_sweep_tg": fit_rows[0]["llmplace_tps"]["tg128_generate"]
                   / best["llmplace_tps"]["tg128_generate"], "best_fitting_sweep": best["placement"]}
    return {"kind": "placements", "budget": args.budget, "rows": rows, "summary": summary}


SIMPLE_SPEED = re.compile(r"decoded (\d+) tokens in ([\d.]+) s, speed: ([\d.]+) t/s")


def llama_simple(path: Path, prompt: str, n: int) -> tuple[int, float]:
    out = subprocess.run([str(BIN_DIR / "llama-simple"), "-m", str(path), "-n", str(n), "-ngl", "99", prompt],
                         capture_output=True, text=True, errors="replace", check=True, cwd=LIB_DIR)
    match = SIMPLE_SPEED.search(out.stderr + out.stdout)
    if not match:
        raise RuntimeError(f"llama-simple printed no speed:\n{out.stderr[-2000:]}")
    return int(match.group(1)), float(match.group(3))


def llama_bench_tg(path: Path, n: int, threads: int) -> float:
    out = subprocess.run([str(BIN_DIR / "llama-bench"), "-m", str(path), "-p", "0", "-n", str(n), "-ngl", "99",
                          "-fa", "1", "-t", str(threads), "-r", "1", "-o", "json"],
                         capture_output=True, text=True, errors="replace", check=True, cwd=LIB_DIR)
    return float(json.loads(out.stdout)[0]["avg_ts"])


def timed_completion(llm, prompt: str, n: int, stream: bool) -> tuple[int, float]:
    """Tokens generated and tokens/s of one greedy completion (timed from the call to the last piece; the
    prompt is a few tokens, as in llama-simple's run, so the figure is the generation loop's)."""
    start = time.perf_counter()
    if stream:
        chunks = list(llm.create_completion(prompt, max_tokens=n, temperature=0, stream=True))
        count = len([c for c in chunks if c["choices"][0]["text"] or c["choices"][0]["finish_reason"] is None])
        elapsed = time.perf_counter() - start
        return count, count / elapsed
    out = llm.create_completion(prompt, max_tokens=n, temperature=0)
    elapsed = time.perf_counter() - start
    count = out["usage"]["completion_tokens"]
    return count, count / elapsed


def dropin(args) -> dict:
    gpu_devices()
    prompt = "Once upon a time"
    rows = []
    for path in map(Path, args.models):
        llm = llmplace.Llama(str(path), n_gpu_layers=-1, n_ctx=1024, flash_attn=True, verbose=False)
        runs = {"llama_simple": [], "llama_bench_tg": [], "create_completion": [], "stream": []}
        counts = {}
        timed_completion(llm, prompt, 16, False)  # warm-up
        for _ in range(args.reps):
            counts["llama_simple"], tps = llama_simple(path, prompt, args.tokens)
            runs["llama_simple"].append(tps)
            runs["llama_bench_tg"].append(llama_bench_tg(path, args.tokens, args.threads))
            for key, stream in (("create_completion", False), ("stream", True)):
                counts[key], tps = timed_completion(llm, prompt, args.tokens, stream)
                runs[key].append(tps)
        llm.close()
        med = {k: statistics.median(v) for k, v in runs.items()}
        row = {"model": path.name, "tokens": counts, "median_tps": med, "runs": runs,
               "ratio_vs_llama_simple": {k: med[k] / med["llama_simple"] for k in ("create_completion", "stream")},
               "ratio_vs_llama_bench_tg": {k: med[k] / med["llama_bench_tg"] for k in ("create_completion", "stream")}}
        print(path.name, json.dumps({k: row[k] for k in ("tokens", "median_tps", "ratio_vs_llama_simple")}),
              flush=True)
        rows.append(row)
    return {"kind": "dropin", "tokens": args.tokens, "prompt": prompt, "rows": rows}


def split(args) -> dict:
    gpus = gpu_devices()
    if len(gpus) < 2:
        raise SystemExit(f"split needs two GPUs, found {len(gpus)}")
    path = Path(args.models[0])
    rows = []
    for mode in ("layer", "tensor"):
        for ratio in ((1, 1), (2, 1)):
            for split_by in (("bytes", "layers") if mode == "layer" else ("bytes",)):
                label = f"{mode} {ratio[0]}:{ratio[1]}" + (f" by {split_by}" if mode == "layer" else "")
                row = compare(path, label, {"split_mode": mode, "tensor_split": list(ratio), "split_by": split_by},
                              ["-sm", mode, "-ts", f"{ratio[0]}/{ratio[1]}"], 99, args.reps, args.threads)
                # weights per GPU: llama.cpp's breakdown where it names the GPUs (layer split), else what each
                # GPU's free memory lost (weights, KV cache and compute buffers together)
                per_gpu = [row["memory"].get(g.name, {}).get("weights", 0) for g in gpus[:2]]
                row["bytes_per_gpu_source"] = "breakdown weights"
                if not all(per_gpu):
                    per_gpu = [row["gpu_bytes_used"][g.name] for g in gpus[:2]]
                    row["bytes_per_gpu_source"] = "free memory lost"
                row["bytes_per_gpu"] = per_gpu
                row["byte_ratio"] = per_gpu[0] / per_gpu[1]
                row["byte_ratio_error"] = row["byte_ratio"] / (ratio[0] / ratio[1]) - 1
                rows.append(row)
    rows.append(compare(path, "one GPU", {"devices": [gpus[0].name]}, ["-dev", gpus[0].name], 99, args.reps,
                        args.threads))
    return {"kind": "split", "rows": rows}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("kind", choices=("placements", "dropin", "split"))
    ap.add_argument("models", nargs="+")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=default_threads())
    ap.add_argument("--budget", default="12GiB")
    ap.add_argument("--sweep", default="16,20,24")
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    result = {"kind": args.kind, "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "machine": machine(), "reps": args.reps,
              **{"placements": placements, "dropin": dropin, "split": split}[args.kind](args)}
    write_result(args.out, result)


if __name__ == "__main__":
    main()
