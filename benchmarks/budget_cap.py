"""A big GPU turned into a small card: does a plan hold its budget for real?

A helper process holds all of the GPU's memory except the budget (PyTorch, one allocation), so the GPU has
exactly `budget` bytes left, as a 4 GiB or 12 GiB card would. Then each case runs in a process of its own: a
llmplace plan (fit under the budget, load, a 512-token prompt, 128 decoded tokens; the prompt again warm) or
llama.cpp's llama-bench built from the same source. nvidia-smi is sampled every 50 ms from this process (which
never touches the GPU itself): the case process's own memory (per process) and the device's (minus what the
helper holds). Passing means: no out-of-memory error, and the case's peak <= budget.

    python benchmarks/budget_cap.py MODEL --budget 4GiB --case fit --case "fit:mmap=0" \\
        --bench "B=-fitt 1024 -lm none" --bench "C=-fitt 1024 -lm none -nopo 1" --out cap.json

--case NAME[:key=value,...]: a llmplace case. NAME "fit" (llmplace.fit under the budget, margin 0),
    "ncmoe=N" (llama.cpp's --n-cpu-moe N, no fit) or "hot" (dense models, hot tensors first: every layer on the
    GPU but its FFN weights in pinned host memory). Keys: mmap (1/0), ctx (tokens), decode (tokens).
--bench NAME=ARGS: a llama-bench run under the same cap (-p 512 -n 32 -r 2 are added).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
MIB = 1 << 20


# ---- the helper that holds the rest of the GPU --------------------------------------------------------
def hold(leave_bytes: int) -> None:
    import torch

    torch.cuda.init()
    free, _ = torch.cuda.mem_get_info()
    take = max(0, free - leave_bytes)
    take -= take % (2 * MIB)  # the caching allocator rounds up to 2 MiB: never leave less than asked
    block = torch.empty(take, dtype=torch.uint8, device="cuda")
    torch.cuda.synchronize()
    free_after, _ = torch.cuda.mem_get_info()
    print(json.dumps(dict(stage="holding", held=take, free_after=free_after)), flush=True)
    sys.stdin.read()  # until the parent closes the pipe
    del block


# ---- nvidia-smi, sampled from outside -----------------------------------------------------------------
class Sampler:
    """nvidia-smi every 50 ms: per-process used memory, and the device's used memory (MiB), with timestamps."""

    def __init__(self) -> None:
        self.process: list[tuple[float, int, int]] = []   # (time, pid, MiB)
        self.device: list[tuple[float, int]] = []         # (time, MiB)
        self._procs = [
            subprocess.Popen(["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits",
                              "-lms", "50"], stdout=subprocess.PIPE, text=True),
            subprocess.Popen(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits", "-i", "0",
                              "-lms", "50"], stdout=subprocess.PIPE, text=True)]
        threading.Thread(target=self._read_process, daemon=True).start()
        threading.Thread(target=self._read_device, daemon=True).start()

    def _read_process(self) -> None:
        for line in self._procs[0].stdout:
            parts = [p.strip() for p in line.split(",")]
            if len(parts) == 2 and parts[0].isdigit() and parts[1].isdigit():
                self.process.append((time.monotonic(), int(parts[0]), int(parts[1])))

    def _read_device(self) -> None:
        for line in self._procs[1].stdout:
            if line.strip().isdigit():
                self.device.append((time.monotonic(), int(line.strip())))

    def peak_of(self, pid: int, start: float, end: float) -> int | None:
        values = [m for t, p, m in self.process if p == pid and start <= t <= end]
        return max(values) if values else None

    def device_peak(self, start: float, end: float) -> int | None:
        values = [m for t, m in self.device if start <= t <= end]
        return max(values) if values else None

    def close(self) -> None:
        for p in self._procs:
            p.terminate()


# ---- one llmplace case, in its own process ------------------------------------------------------------
def run_case(spec: dict) -> None:
    import random

    import llmplace
    from llmplace.memory import breakdown
    from llmplace.placement import Rule, n_cpu_moe

    def event(stage: str, **data) -> None:
        print(json.dumps(dict(stage=stage, t=time.monotonic(), **data)), flush=True)

    event("start")
    gpu = next(d for d in llmplace.devices() if d.kind == "gpu")
    kwargs = dict(progress=False, use_mmap=bool(spec.get("mmap", 1)))
    n_ctx = int(spec.get("ctx", 4096))
    if spec["name"] == "fit":
        t0 = time.perf_counter()
        plan = llmplace.fit(spec["model"], budget={gpu.name: spec["budget"]}, margin=0, n_ctx=n_ctx,
                            use_mmap=kwargs["use_mmap"])
        event("fitted", seconds=time.perf_counter() - t0, success=plan.success, message=plan.message,
              estimate=str(plan.estimate), runtime=plan.estimate[gpu.name].runtime if gpu.name in
              plan.estimate.memories else 0, planned=plan.estimate[gpu.name].total if gpu.name in
              plan.estimate.memories else 0, n_gpu_layers=plan.n_gpu_layers, ot=plan.to_ot())
        if not plan.success:
            return
        kwargs.update(plan.load_kwargs())
    elif spec["name"] == "hot":
        # hot tensors first: every layer offloaded, but every layer's FFN weights in the GPU's pinned host memory
        # (decode computes them on the CPU, prompts reach them by op offload); attention, norms, KV on the GPU
        kwargs.update(n_gpu_layers=-1, placement=[Rule("cuda_host", pattern=r"\.ffn_(up|gate|down)\.weight")])
        plan = llmplace.estimate(spec["model"], kwargs["placement"], n_ctx=n_ctx, use_mmap=kwargs["use_mmap"])
        event("fitted", seconds=0, success=True, message="hot tensors first", estimate=str(plan),
              runtime=plan[gpu.name].runtime, planned=plan[gpu.name].total, n_gpu_layers=-1, ot="")
    else:
        kwargs.update(placement=n_cpu_moe(int(spec["name"].split("=")[1])))
    t0 = time.perf_counter()
    model = llmplace.load(spec["model"], **kwargs)
    ctx = llmplace.Context(model, n_ctx=n_ctx)
    event("loaded", seconds=time.perf_counter() - t0,
          buffers={k: v.buffers for k, v in breakdown(ctx._ptr).items()})
    rng = random.Random(0)
    decode = int(spec.get("decode", 128))
    results = {}
    # random weights may pick an end-of-generation token: ban them, so that every run decodes n_gen tokens
    ban = {t: -1e9 for t in range(model.n_vocab) if model.vocab.is_eog(t)}
    for phase, n_gen in (("cold", decode), ("warm", min(decode, 32))):
        ctx.clear()
        prompt = [rng.randrange(1000, model.n_vocab - 1) for _ in range(512)]
        event(f"{phase}_prompt")
        r = llmplace.generate(model, prompt, max_tokens=n_gen, temperature=0, context=ctx, logit_bias=ban)
        results[phase] = dict(prompt_tps=r.prompt_tps, ttft=512 / r.prompt_tps if r.prompt_tps else None,
                              decode_tps=r.generation_tps, decoded=len(r.tokens))
        event(f"{phase}_done", **results[phase])
    ctx.close()
    model.close()
    event("end")


def run_llmplace(sampler: Sampler, spec: dict) -> dict:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    child = subprocess.Popen([sys.executable, __file__, "--run-case", json.dumps(spec)], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, env=env)
    start = time.monotonic()
    events = []
    # a case that outlives its time is killed (and reported), so one stuck case does not eat the others' time
    watchdog = threading.Timer(float(spec.get("timeout", 300)), child.kill)
    watchdog.start()
    for line in child.stdout:
        if line.startswith("{"):
            events.append(json.loads(line))
            print("   ", spec["label"], events[-1]["stage"], f"{events[-1]['t'] - start:.1f}s", flush=True)
    stderr = child.stderr.read()
    child.wait()
    watchdog.cancel()
    time.sleep(0.2)
    end = time.monotonic()
    stamps = {e["stage"]: e["t"] for e in events}
    phases = {}
    order = ["start", "fitted", "loaded", "cold_prompt", "cold_done", "warm_prompt", "warm_done", "end"]
    present = [s for s in order if s in stamps]
    for a, b in zip(present, present[1:]):
        phases[f"{a}->{b}"] = dict(process_mib=sampler.peak_of(child.pid, stamps[a], stamps[b]),
                                   device_mib=sampler.device_peak(stamps[a], stamps[b]))
    result = dict(spec=spec, returncode=child.returncode, events=events, phases=phases,
                  peak_process_mib=sampler.peak_of(child.pid, start, end),
                  peak_device_mib=sampler.device_peak(start, end),
                  stderr_tail=stderr[-3000:] if child.returncode else stderr[-600:])
    result["oom"] = child.returncode != 0 and bool(re.search(r"out of memory|failed to allocate|OutOfMemory",
                                                             stderr, re.I))
    return result


def run_bench(sampler: Sampler, label: str, model: str, args: str) -> dict:
    from llmplace._ffi import BIN_DIR, LIB_DIR

    cmd = [str(BIN_DIR / "llama-bench"), "-m", model, "-p", "512", "-n", "32", "-r", "2", "-o", "json",
           *args.split()]
    start = time.monotonic()
    child = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=LIB_DIR)
    try:
        out, err = child.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        child.kill()
        out, err = child.communicate()
    time.sleep(0.2)
    end = time.monotonic()
    result = dict(label=label, cmd=" ".join(cmd[1:]), returncode=child.returncode,
                  peak_process_mib=sampler.peak_of(child.pid, start, end),
                  peak_device_mib=sampler.device_peak(start, end), stderr_tail=err[-2000:])
    try:
        rows = json.loads(out)
        result["pp512"] = next(r["avg_ts"] for r in rows if r["n_prompt"] == 512)
        result["tg32"] = next(r["avg_ts"] for r in rows if r["n_gen"] == 32)
        result["n_gpu_layers"] = rows[0].get("n_gpu_layers")
    except (ValueError, StopIteration, KeyError):
        result["stdout_tail"] = out[-1000:]
    return result


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--budget", default="4GiB")
    ap.add_argument("--case", action="append", default=[])
    ap.add_argument("--bench", action="append", default=[])
    ap.add_argument("--out")
    args = ap.parse_args()
    from llmplace.memory import parse_size  # no GPU use: only the size parser

    budget = parse_size(args.budget)
    sampler = Sampler()
    time.sleep(1.0)
    idle = sampler.device_peak(0, time.monotonic())
    helper = subprocess.Popen([sys.executable, __file__, "--hold", str(budget)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    holding = json.loads(helper.stdout.readline())
    time.sleep(1.0)
    baseline = sampler.device_peak(time.monotonic() - 0.5, time.monotonic())
    print(f"holding {holding['held'] >> 20} MiB; the GPU has {holding['free_after'] >> 20} MiB free "
          f"(budget {budget >> 20} MiB); device used {baseline} MiB", flush=True)
    report = dict(model=args.model, budget_mib=budget >> 20, idle_device_mib=idle, helper=holding,
                  baseline_device_mib=baseline, cases=[], bench=[])
    try:
        for case in args.case:
            name, _, opts = case.partition(":")
            spec = dict(label=case, name=name, model=args.model, budget=budget,
                        **{k: (int(v) if v.lstrip("-").isdigit() else v)
                           for k, v in (o.split("=") for o in opts.split(",") if o)})
            result = run_llmplace(sampler, spec)
            if result["peak_device_mib"] is not None and baseline is not None:
                result["peak_device_minus_helper_mib"] = result["peak_device_mib"] - baseline
            result["within_budget"] = (result["returncode"] == 0 and result["peak_process_mib"] is not None
                                       and result["peak_process_mib"] <= budget >> 20)
            print(json.dumps({k: v for k, v in result.items() if k not in ("events", "stderr_tail")}), flush=True)
            if result["returncode"]:
                print(result["stderr_tail"][-1500:], flush=True)
            report["cases"].append(result)
            if args.out:  # what is done so far survives a run cut short
                Path(args.out).write_text(json.dumps(report, indent=1))
        for item in args.bench:
            label, _, bench_args = item.partition("=")
            result = run_bench(sampler, label, args.model, bench_args)
            result["within_budget"] = (result["returncode"] == 0 and result["peak_process_mib"] is not None
                                       and result["peak_process_mib"] <= budget >> 20)
            print(json.dumps({k: v for k, v in result.items() if k != "stderr_tail"}), flush=True)
            report["bench"].append(result)
            if args.out:
                Path(args.out).write_text(json.dumps(report, indent=1))
    finally:
        helper.stdin.close()
        helper.wait(timeout=30)
        sampler.close()
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--hold":
        hold(int(sys.argv[2]))
    elif len(sys.argv) > 2 and sys.argv[1] == "--run-case":
        run_case(json.loads(sys.argv[2]))
    else:
        main()
