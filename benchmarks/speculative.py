"""Speculative decoding: tokens/s with and without speculation, and the acceptance rate, on one target model.

    python benchmarks/speculative.py [MODEL.gguf] [--threads N] [--reps 3] [--max-tokens 128]
                                     [--depth 5] [--n-gpu-layers 0] [--out FILE.json]

Cases, all greedy (so every case emits the same tokens as plain decoding, which the script checks), each
on a text prompt and, for prompt lookup, on an "edit this code" chat prompt:
- plain: no speculation (the baseline of each prompt);
- self draft: the target drafting for itself, fixed depth: every token accepted, each drafted token as
  costly as a target step: the ceiling of acceptance, not of speed;
- requantized draft: the target requantized to q4_0 by llmplace.quantize (same size class: on its own it
  shows the verification machinery, not a small-draft speedup), fixed and adaptive depth;
- random draft: a tiny random-weight llama with the target's tokenizer (tests/models.py): a draft that is
  always wrong, adaptive depth: what a bad draft costs;
- lookup: prompt lookup (n-gram match in the context), fixed and adaptive depth.
Reps are interleaved case by case, each case run right after a plain run of its prompt (its baseline); the
figure is the median decode rate (generated tokens / seconds after the prompt), and the ratio the median of
the ratios to those baselines. On a shared machine
other processes make rates jitter by 10-30%, so each row also has the best rep against the best plain rep
("best" fields: a busy neighbour only ever slows a run down), and the rates in this process's CPU time
from the first token on ("cpu" fields: time the process was descheduled does not count; time its core was
slowed by a neighbour still does).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import llmplace
from llmplace.context import default_threads

TEXT_PROMPT = ("<|im_start|>user\nWrite a short story about a lighthouse keeper who finds a message in a bottle."
               "<|im_end|>\n<|im_start|>assistant\n")
CODE = '''def mean(values):
    total = 0
    for v in values:
        total += v
    return total / len(values)


def variance(values):
    m = mean(values)
    total = 0
    for v in values:
        total += (v - m) ** 2
    return total / len(values)
'''
EDIT_PROMPT = ("<|im_start|>user\nRename the parameter `values` to `xs` in this code and output the whole code:\n\n"
               f"{CODE}<|im_end|>\n<|im_start|>assistant\n")


def default_model() -> Path:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    import models

    return models.smollm2_path()


def run_case(model, prompt, args, **spec) -> dict:
    # Every case generates max_tokens tokens: end-of-generation tokens get a -inf bias (applied alike with and
    # without speculation).
    eog = {t: -1e9 for t in (model.vocab.eos, model.vocab.eot) if t is not None}
    # Besides the wall-clock rate, the rate in this process's CPU time from the first token on: on a shared
    # machine other processes take cores away at random, which wall-clock time counts and CPU time does not.
    tokens, first = [], None
    with llmplace.Context(model, n_ctx=1024, n_threads=args.threads) as ctx:
        for step in llmplace.stream_generate(model, prompt, max_tokens=args.max_tokens, temperature=0, context=ctx,
                                             logit_bias=eog, **spec):
            tokens.append(step.token)
            if first is None:
                first = (time.process_time(), len(tokens))
            last = step
        cpu_s = time.process_time() - first[0]
    stats = last.speculative
    return {"tokens": tokens, "tps": last.generation_tps, "cpu_tps": (len(tokens) - first[1]) / max(cpu_s, 1e-9),
            "drafted": stats.drafted if stats else 0, "accepted": stats.accepted if stats else 0,
            "rounds": stats.rounds if stats else len(tokens)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", nargs="?", type=Path, default=None)
    parser.add_argument("--threads", type=int, default=default_threads())
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--depth", type=int, default=5)
    parser.add_argument("--n-gpu-layers", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    model_path = args.model or default_model()

    work = Path(tempfile.mkdtemp(prefix="llmplace-spec-bench-"))
    requantized = llmplace.quantize(model_path, work / "draft-q4_0.gguf", "q4_0")
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    import models

    target = llmplace.load(model_path, n_gpu_layers=args.n_gpu_layers, progress=False)
    drafts = {"requantized": llmplace.load(requantized, n_gpu_layers=args.n_gpu_layers, progress=False)}
    try:
        drafts["random"] = llmplace.load(models.synthetic_path(work, "tiny-llama"), n_gpu_layers=args.n_gpu_layers,
                                         progress=False)
    except Exception as exc:  # noqa: BLE001 - the synthetic writer needs the gguf package
        print(f"no random draft: {exc}", file=sys.stderr)
    d = args.depth
    cases = [
        ("text", "plain", {}),
        ("text", "self draft, fixed", {"draft": target, "depth": d, "adaptive_depth": False}),
        ("text", "self draft, adaptive", {"draft": target, "depth": d}),
        ("text", "requantized q4_0 draft, fixed",
         {"draft": drafts["requantized"], "depth": d, "adaptive_depth": False}),
        ("text", "requantized q4_0 draft, adaptive", {"draft": drafts["requantized"], "depth": d}),
        ("text", "lookup, adaptive", {"lookup": True, "depth": d}),
        ("edit", "plain", {}),
        ("edit", "lookup, fixed", {"lookup": True, "depth": d, "adaptive_depth": False}),
        ("edit", "lookup, adaptive", {"lookup": True, "depth": d}),
        ("edit", "requantized q4_0 draft, adaptive", {"draft": drafts["requantized"], "depth": d}),
    ]
    if "random" in drafts:
        cases.insert(5, ("text", "random draft, fixed",
                         {"draft": drafts["random"], "depth": d, "adaptive_depth": False}))
        cases.insert(6, ("text", "random draft, adaptive", {"draft": drafts["random"], "depth": d}))
    prompts = {"text": TEXT_PROMPT, "edit": EDIT_PROMPT}
    runs: dict[tuple[str, str], list[dict]] = {(p, name): [] for p, name, _ in cases}
    baselines: dict[tuple[str, str], list[dict]] = {(p, name): [] for p, name, _ in cases}
    for _ in range(args.reps):
        for prompt_name, name, spec in cases:
            if name == "plain":
                continue
            # Each case runs right after a plain run of its prompt, its baseline: the load other processes put
            # on a shared machine drifts over seconds, and a baseline next to the case cancels most of it.
            plain_run = run_case(target, prompts[prompt_name], args)
            runs[(prompt_name, "plain")].append(plain_run)
            baselines[(prompt_name, name)].append(plain_run)
            runs[(prompt_name, name)].append(run_case(target, prompts[prompt_name], args, **spec))
    for prompt_name in prompts:
        baselines[(prompt_name, "plain")] = runs[(prompt_name, "plain")]

    rows = []
    for prompt_name, name, _ in cases:
        reps = runs[(prompt_name, name)]
        baseline = baselines[(prompt_name, name)]
        identical = all(r["tokens"] == baseline[0]["tokens"] for r in reps)
        ratios = [r["tps"] / b["tps"] for r, b in zip(reps, baseline)]
        cpu_ratios = [r["cpu_tps"] / b["cpu_tps"] for r, b in zip(reps, baseline)]
        drafted, accepted = sum(r["drafted"] for r in reps), sum(r["accepted"] for r in reps)
        rows.append({"prompt": prompt_name, "case": name, "tokens_per_s": statistics.median(r["tps"] for r in reps),
                     "ratio_to_plain": statistics.median(ratios), "ratios": ratios,
                     "tokens_per_s_each": [r["tps"] for r in reps],
                     # Best of the reps, each case against the best plain run: what the least disturbed
                     # runs did (a busy neighbour only ever slows a run down).
                     "best_ratio_to_plain": max(r["tps"] for r in reps) / max(b["tps"] for b in baseline),
                     "cpu_tokens_per_s": statistics.median(r["cpu_tps"] for r in reps),
                     "cpu_tokens_per_s_each": [r["cpu_tps"] for r in reps],
                     "cpu_best_ratio_to_plain": max(r["cpu_tps"] for r in reps) / max(b["cpu_tps"] for b in baseline),
                     "cpu_ratio_to_plain": statistics.median(cpu_ratios), "cpu_ratios": cpu_ratios,
                     "drafted": drafted // len(reps),
                     "accepted": accepted // len(reps), "acceptance_rate": accepted / drafted if drafted else None,
                     "tokens_per_target_decode": statistics.median(len(r["tokens"]) / r["rounds"] for r in reps),
                     "same_tokens_as_plain": identical, "generated": len(reps[0]["tokens"])})
    result = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "machine": platform.node(),
              "processor": platform.processor() or platform.machine(), "model": model_path.name,
              "target": target.description, "threads": args.threads, "reps": args.reps,
              "max_tokens": args.max_tokens, "depth": args.depth, "n_gpu_layers": args.n_gpu_layers,
              "devices": [dev.name for dev in llmplace.devices()],
              # This machine is shared: the load average says how much else ran during the measurement.
              "load_average_after": list(os.getloadavg()), "rows": rows}
    print(f"{'prompt':6} {'case':34} {'tok/s':>7} {'ratio':>6} {'best':>6} {'cpu r.':>6} {'best':>6} {'drafted':>7} "
          f"{'accept':>6} {'tok/dec':>7} same")
    for r in rows:
        rate = "-" if r["acceptance_rate"] is None else f"{r['acceptance_rate']:.2f}"
        print(f"{r['prompt']:6} {r['case']:34} {r['tokens_per_s']:7.1f} {r['ratio_to_plain']:6.2f} "
              f"{r['best_ratio_to_plain']:6.2f} {r['cpu_ratio_to_plain']:6.2f} {r['cpu_best_ratio_to_plain']:6.2f} "
              f"{r['drafted']:7d} {rate:>6} {r['tokens_per_target_decode']:7.2f} {r['same_tokens_as_plain']}")
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    for model in (target, *drafts.values()):
        model.close()


if __name__ == "__main__":
    main()
