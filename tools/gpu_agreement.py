"""CPU vs GPU greedy agreement on a real model, and llama-simple's own CPU and GPU text as the reference for
what llama.cpp itself does (run on the GPU machine; see tools/gpu_suite.sh).

    python tools/gpu_agreement.py MODEL.gguf [--tokens 256]
"""

from __future__ import annotations

import argparse
import subprocess

import llmplace
from llmplace._ffi import BIN_DIR, LIB_DIR

PROMPTS = [
    "The history of the printing press begins",
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
    "Photosynthesis is the process by which",
]


def llama_simple(path: str, prompt: str, n: int, ngl: int) -> str:
    out = subprocess.run([str(BIN_DIR / "llama-simple"), "-m", path, "-n", str(n), "-ngl", str(ngl), prompt],
                         capture_output=True, text=True, errors="replace", cwd=LIB_DIR)
    return out.stdout


def teacher_forced(model, prompt: str, reference: list[int], **ctx_kwargs) -> int:
    """Positions where `model`'s greedy choice, fed the reference text one token at a time, equals it."""
    agree = 0
    with llmplace.Context(model, n_ctx=1024, **ctx_kwargs) as ctx:
        ctx.decode(model.tokenize(prompt))
        for token in reference:
            agree += int(ctx.logits().argmax()) == token
            ctx.decode([token])
    return agree


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--tokens", type=int, default=256)
    args = ap.parse_args()
    with llmplace.load(args.model, n_gpu_layers=0, progress=False) as cpu, \
            llmplace.load(args.model, progress=False) as gpu:
        for prompt in PROMPTS:
            print("=" * 80, "\nPROMPT", repr(prompt))
            for ngl in (0, 99):
                print(f"-- llama-simple -ngl {ngl}:", repr(llama_simple(args.model, prompt, 48, ngl)[-300:]))
            reference = llmplace.generate(cpu, prompt, max_tokens=args.tokens, temperature=0)
            print("-- llmplace CPU:", repr(reference.text[:300]))
            for fa in (True, False):
                with llmplace.Context(gpu, n_ctx=1024, flash_attn=fa) as ctx:
                    text = llmplace.generate(gpu, prompt, max_tokens=args.tokens, temperature=0, context=ctx).text
                n = len(reference.tokens)
                print(f"-- llmplace GPU fa={fa}:", repr(text[:300]))
                print(f"   teacher-forced agreement fa={fa}: "
                      f"{teacher_forced(gpu, prompt, reference.tokens, flash_attn=fa)}/{n}")
            agreed = teacher_forced(cpu, prompt, reference.tokens)
            print(f"   CPU vs CPU teacher-forced: {agreed}/{len(reference.tokens)}")


if __name__ == "__main__":
    main()
