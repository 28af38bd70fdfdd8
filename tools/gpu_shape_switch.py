"""What a change of batch size costs a decode on this machine: the pattern speculative decoding makes (one
verification batch of depth + 1 tokens, then one-token decodes), timed call by call, against steady runs of
one size. On CUDA it shows whether captured graphs survive a change of shape (see
tools/vendor_llama_cpp.py, one_cuda_graph_per_batch_shape).

    python tools/gpu_shape_switch.py MODEL.gguf [--n-gpu-layers 99] [--size 6] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import llmplace


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--n-gpu-layers", type=int, default=99)
    ap.add_argument("--size", type=int, default=6)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    with llmplace.load(args.model, n_gpu_layers=args.n_gpu_layers, progress=False) as model, \
            llmplace.Context(model, n_ctx=1024) as ctx:
        token = model.vocab.bos if model.vocab.bos is not None else 1
        ctx.decode([token] * 64)

        def timed(n: int) -> float:
            t0 = time.perf_counter()
            ctx.decode_all([token] * n)
            seconds = time.perf_counter() - t0
            ctx.truncate(len(ctx.tokens) - n + 1)   # keep the cache from growing: one token per call stays
            return seconds * 1e3

        steady = {n: [timed(n) for _ in range(20)][4:] for n in (1, args.size)}
        # The speculative pattern: a batch, then three one-token decodes; ten times over.
        rounds = [[timed(args.size), timed(1), timed(1), timed(1)] for _ in range(10)][2:]
        result = {
            "model": Path(args.model).name, "size": args.size,
            "steady_ms": {n: round(statistics.median(v), 3) for n, v in steady.items()},
            "switching_ms": {f"{label}": round(statistics.median(r[i] for r in rounds), 3)
                             for i, label in enumerate(["batch after 1", "1st single after", "2nd single",
                                                        "3rd single"])},
        }
    print(json.dumps(result, indent=1))
    if args.out:
        args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
