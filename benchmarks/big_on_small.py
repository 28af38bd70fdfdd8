"""A model far larger than the GPU budget ("70B on a 4 GB GPU"): fit, load, time to first token of a
512-token prompt, decode speed, and the GPU memory actually used (nvidia-smi, polled every 50 ms).

    python benchmarks/big_on_small.py MODEL.gguf --budget 4GiB [--no-mmap] --out result.json
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import threading
import time

import llmplace
from llmplace.memory import breakdown


class VramPeak(threading.Thread):
    """Polls nvidia-smi's used memory (MiB) of GPU 0 until stopped; keeps the peak."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.peak, self.samples, self._stop_event = 0, 0, threading.Event()

    def run(self) -> None:
        while not self._stop_event.is_set():
            try:
                out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits",
                                      "-i", "0"], capture_output=True, text=True, timeout=5).stdout
                self.peak = max(self.peak, int(out.split()[0]))
                self.samples += 1
            except Exception:  # noqa: BLE001 - no nvidia-smi: no reading
                return
            self._stop_event.wait(0.05)

    def stop(self) -> int:
        self._stop_event.set()
        self.join()
        return self.peak


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--budget", default="4GiB")
    ap.add_argument("--ctx", type=int, default=1024)
    ap.add_argument("--decode", type=int, default=32)
    ap.add_argument("--no-mmap", action="store_true", help="copy host weights into pinned memory (CUDA_Host)")
    ap.add_argument("--out")
    args = ap.parse_args()
    gpu = next(d for d in llmplace.devices() if d.kind in ("gpu", "rpc"))  # rpc: a trial run without a GPU
    base_mib = VramPeak()
    base_mib.start()
    time.sleep(0.3)
    idle = base_mib.stop()

    peak = VramPeak()
    peak.start()
    t0 = time.perf_counter()
    plan = llmplace.fit(args.model, budget={gpu.name: args.budget}, margin=0, n_ctx=args.ctx)
    t_fit = time.perf_counter() - t0
    print("fit:", plan.success, plan.message, flush=True)
    t0 = time.perf_counter()
    model = llmplace.load(args.model, progress=False, use_mmap=not args.no_mmap, **plan.load_kwargs())
    t_load = time.perf_counter() - t0
    ctx = llmplace.Context(model, n_ctx=args.ctx)
    allocated = {k: v.total for k, v in breakdown(ctx._ptr).items()}
    rng = random.Random(0)
    prompt = [rng.randrange(1000, model.n_vocab - 1) for _ in range(512)]
    t0 = time.perf_counter()
    first = None
    n = 0
    for _step in llmplace.stream_generate(model, prompt, max_tokens=args.decode + 1, temperature=0, context=ctx):
        n += 1
        if first is None:
            first = time.perf_counter()
    end = time.perf_counter()
    vram_peak = peak.stop()
    ttft = first - t0
    decode_tps = (n - 1) / (end - first) if n > 1 else 0.0
    report = dict(model=args.model, device=gpu.description, budget=args.budget, mmap=not args.no_mmap,
                  fit_message=plan.message, fit_seconds=t_fit, load_seconds=t_load, n_gpu_layers=plan.n_gpu_layers,
                  allocated_bytes=allocated, vram_idle_mib=idle, vram_peak_mib=vram_peak, vram_samples=peak.samples,
                  ttft_512_seconds=ttft, decode_tps=decode_tps, decoded=n - 1, model_bytes=model.size)
    print(json.dumps(report, indent=2))
    ctx.close()
    model.close()
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()
