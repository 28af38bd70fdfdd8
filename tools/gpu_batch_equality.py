"""Are a batch's logits the same as one-token decodes' on this backend? (Speculative decoding's greedy
equality rests on it.) For each model and flash-attention setting: decode a prompt, then the same k tokens
once one at a time and once as one batch with logits for every row, and compare the rows bit for bit.

    python tools/gpu_batch_equality.py MODEL.gguf [MODEL2.gguf ...] [--k 6]
"""

from __future__ import annotations

import argparse
import random

import numpy as np

import llmplace


def rows_one_at_a_time(model, prompt, tokens, **kw) -> np.ndarray:
    with llmplace.Context(model, n_ctx=256, **kw) as ctx:
        ctx.decode(prompt)
        rows = [ctx.logits()]
        for t in tokens[:-1]:
            ctx.decode([t])
            rows.append(ctx.logits())
    return np.stack(rows)


def rows_batched(model, prompt, tokens, **kw) -> np.ndarray:
    with llmplace.Context(model, n_ctx=256, **kw) as ctx:
        ctx.decode(prompt[:-1])
        return ctx.decode_all([prompt[-1], *tokens[:-1]])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("models", nargs="+")
    ap.add_argument("--k", type=int, default=6)
    args = ap.parse_args()
    rng = random.Random(0)
    for path in args.models:
        with llmplace.load(path, progress=False) as model:
            prompt = [rng.randrange(100, model.n_vocab) for _ in range(24)]
            tokens = [rng.randrange(100, model.n_vocab) for _ in range(args.k)]
            for kw in ({"flash_attn": True}, {"flash_attn": False}):
                one, batch = rows_one_at_a_time(model, prompt, tokens, **kw), rows_batched(model, prompt, tokens, **kw)
                same = [bool(np.array_equal(a, b)) for a, b in zip(one, batch)]
                diff = float(np.max(np.abs(one - batch)))
                argmax = [int(a.argmax()) == int(b.argmax()) for a, b in zip(one, batch)]
                print(f"{path.split('/')[-1]:<24} {kw}: rows bit-identical {same}, max |diff| {diff:.3g}, "
                      f"argmax equal {argmax}", flush=True)


if __name__ == "__main__":
    main()
