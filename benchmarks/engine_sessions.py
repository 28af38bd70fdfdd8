"""What a session of the Engine costs when it leaves its slot and comes back: the time to save one sequence's
KV state to host memory, the time to restore it, its bytes, and the prompt computation a restore replaces.

    python benchmarks/engine_sessions.py [MODEL.gguf] [--contexts 256,1024,4096] [--reps 3] [--gpu-layers -1]
                                         [--out FILE.json]

For each context length N: a Context made as the Engine makes its own (two sequences, a KV cache per sequence)
computes an N-token prompt in sequence 0, in decodes of n_batch tokens as the Engine's prefill does
("recompute_s": what a session's next turn would cost without its state). Then `engine.save_sequence` copies
sequence 0's state to host memory ("save_s" into a new buffer, "save_reused_s" into the buffer of a state
saved before, as the Engine reuses the buffer of the state it freed last; "bytes") and
`engine.restore_sequence` puts it into sequence 1 ("restore_s"), REPS times each (medians kept, every run in
the JSON). A check: the next token decoded after the restored state has bit for bit the logits of the same
token decoded after the computed one ("restored_logits_equal").
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from datetime import datetime, timezone
from pathlib import Path

TEXT = ("The lighthouse keeper climbed the stairs every evening at dusk. The sea below was grey and restless, the "
        "wind carried salt and rain, and the lamp waited for him at the top of the tower. ")


def _prefill(context, seq_id: int, tokens: list[int], n_batch: int) -> None:
    for start in range(0, len(tokens), n_batch):
        piece = tokens[start:start + n_batch]
        context.decode_batch([(seq_id, t, start + i, start + i == len(tokens) - 1) for i, t in enumerate(piece)])


def _measure(model, n_tokens: int, reps: int, n_gpu_layers: int) -> dict:
    import numpy as np

    from llmplace.context import Context
    from llmplace.engine import restore_sequence, save_sequence

    text_tokens = model.tokenize(TEXT * (n_tokens // 30 + 2))
    tokens, probe = text_tokens[:n_tokens], text_tokens[n_tokens]
    n_batch = 512
    runs = []
    with Context(model, n_ctx=2 * (n_tokens + 256), n_batch=n_batch, n_seq_max=2,
                 extra_params={"kv_unified": False}) as context:
        for _ in range(reps):
            context.remove_sequence(0)
            context.remove_sequence(1)
            started = time.perf_counter()
            _prefill(context, 0, tokens, n_batch)
            context.synchronize()
            recompute = time.perf_counter() - started
            started = time.perf_counter()
            state = save_sequence(context, 0)
            save = time.perf_counter() - started
            started = time.perf_counter()
            state = save_sequence(context, 0, state.obj)  # into the buffer of a state freed before, as the Engine
            save_reused = time.perf_counter() - started
            started = time.perf_counter()
            restore_sequence(context, 1, state, tokens)
            context.synchronize()
            restore = time.perf_counter() - started
            runs.append({"recompute_s": round(recompute, 5), "save_s": round(save, 5),
                         "save_reused_s": round(save_reused, 5), "restore_s": round(restore, 5), "bytes": len(state)})
        # the token after the prompt, decoded after the computed state and after the restored one
        computed = context.logits(context.decode_batch([(0, probe, n_tokens, True)])[0])
        restored = context.logits(context.decode_batch([(1, probe, n_tokens, True)])[0])
        equal = bool(np.array_equal(computed, restored))

    def median(key: str) -> float:
        return round(statistics.median(r[key] for r in runs), 5)

    row = {"tokens": n_tokens, "bytes": runs[-1]["bytes"], "bytes_per_token": runs[-1]["bytes"] // n_tokens,
           "recompute_s": median("recompute_s"), "save_s": median("save_s"), "save_reused_s": median("save_reused_s"),
           "restore_s": median("restore_s"),
           "restored_logits_equal": equal, "runs": runs}
    row["restore_speedup"] = round(row["recompute_s"] / max(row["restore_s"], 1e-9), 1)
    return row


def main() -> None:
    import llmplace
    from llmplace.demo_model import locate

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", nargs="?", help="GGUF file (default: the embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--contexts", default="256,1024,4096", help="comma-separated prompt lengths in tokens")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--gpu-layers", type=int, default=-1,
                        help="layers on the GPU, as load()'s n_gpu_layers (default: all; the KV cache goes with them)")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    model_path = args.model or str(locate())
    rows = []
    load_before = os.getloadavg()[0]
    with llmplace.load(model_path, n_gpu_layers=args.gpu_layers, progress=False) as model:
        for n in (int(c) for c in args.contexts.split(",")):
            row = _measure(model, n, args.reps, args.gpu_layers)
            rows.append(row)
            print(f"{n:5} tokens: {row['bytes'] / 2**20:7.1f} MiB  save {row['save_s'] * 1e3:8.2f} ms (into a "
                  f"reused buffer {row['save_reused_s'] * 1e3:8.2f} ms)  restore "
                  f"{row['restore_s'] * 1e3:8.2f} ms  recompute {row['recompute_s'] * 1e3:9.2f} ms  "
                  f"(restore {row['restore_speedup']}x faster; logits equal: {row['restored_logits_equal']})",
                  flush=True)
    report = {"benchmark": "engine_sessions", "model": Path(model_path).name, "n_gpu_layers": args.gpu_layers,
              "reps": args.reps, "logical_cpus": os.cpu_count(), "affinity_cpus": len(os.sched_getaffinity(0)),
              "loadavg_1min_before": round(load_before, 2), "loadavg_1min_after": round(os.getloadavg()[0], 2),
              "machine": platform.machine(), "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "results": rows}
    if args.out:
        args.out.write_text(json.dumps(report, indent=1) + "\n")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
