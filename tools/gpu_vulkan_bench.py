"""Vulkan0 against CUDA0 on the same NVIDIA GPU, then both in one process, then experts on the CPU with the rest on
Vulkan0 (issue 19). Run by tools/gpu_vulkan_bench.sh, which sets up the CUDA stage, NVIDIA's Vulkan driver and the
Vulkan module; each row is benchmarks/gpu_suite.py's `compare` (llama-bench and llmplace interleaved rep by rep on
the same placement: pp512 and tg128), plus whether explain equals where the tensors landed and the greedy text.

    python tools/gpu_vulkan_bench.py dense llama-8b.gguf --out vulkan-dense.json
    python tools/gpu_vulkan_bench.py moe qwen3-30b-a3b.gguf --out vulkan-moe.json
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
from datetime import datetime, timezone
from pathlib import Path

import llmplace
from llmplace.placement import is_host_buffer, read_back
from llmplace.planning import explain

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
from gpu_suite import compare, machine  # noqa: E402

GREEDY_PROMPT = "The history of the printing press begins"


def placement_check(path: Path, load_kwargs: dict) -> dict:
    """Explain against read-back (tensor by tensor, and bytes per memory), and 32 greedy tokens."""
    plan_kwargs = {k: v for k, v in load_kwargs.items() if k != "placement"}
    plan = explain(path, load_kwargs.get("placement"), **plan_kwargs)
    with llmplace.load(path, progress=False, **load_kwargs) as model:
        landed = model.placement_report()
        loaded: dict[str, int] = {}
        for buffer_type, n_bytes in read_back(model).values():
            memory = "host" if is_host_buffer(buffer_type) else buffer_type
            loaded[memory] = loaded.get(memory, 0) + n_bytes
        tokens = llmplace.generate(model, GREEDY_PROMPT, max_tokens=32, temperature=0).tokens
    planned = [(t.name, t.memory, t.rule) for t in plan.tensors]
    actual = [(t.name, t.memory, t.rule) for t in landed]
    mismatched = [want[0] for want, got in zip(planned, actual) if want != got]
    return {"explain_equals_read_back": not mismatched and len(planned) == len(landed)
            and plan.memory_totals() == loaded, "mismatched_tensors": mismatched[:20],
            "planned_bytes": plan.memory_totals(), "loaded_bytes": loaded, "greedy_tokens": tokens}


def vulkan_module() -> dict:
    """What the Vulkan module was built from: its _build_info (commit, headers, the optional GLSL extensions its
    shaders were compiled with: none means no cooperative-matrix or integer-dot paths on this GPU)."""
    info = importlib.import_module("llmplace_vulkan._build_info")
    return {k: v for k, v in vars(info).items() if k.isupper()}


def common_prefix(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("kind", choices=["dense", "moe"])
    parser.add_argument("model", type=Path)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 8)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    names = {d.name for d in llmplace.devices()}
    missing = {"CUDA0", "Vulkan0"} - names
    if missing:
        modules = [(m.name, str(m.path), m.error) for m in llmplace.backend_modules() if not m.loaded]
        raise SystemExit(f"no {', '.join(sorted(missing))} here (devices: {sorted(names)}; modules that did not "
                         f"load: {modules})")
    if args.kind == "dense":
        configs = [
            ("CUDA0", {"devices": ["CUDA0"]}, ["-dev", "CUDA0"]),
            ("Vulkan0", {"devices": ["Vulkan0"]}, ["-dev", "Vulkan0"]),
            # two backends as two devices of one process, on the same GPU: half the layers each (by count, as
            # llama-bench's -ts reads it), the activations crossing between them through host memory
            ("CUDA0 + Vulkan0, layers 1:1", {"devices": ["CUDA0", "Vulkan0"], "tensor_split": [1, 1],
                                             "split_by": "layers"}, ["-dev", "CUDA0/Vulkan0", "-ts", "1/1"]),
        ]
    else:
        configs = [
            ("CUDA0, experts on CPU", {"devices": ["CUDA0"], "placement": "exps=CPU"},
             ["-dev", "CUDA0", "-ot", "exps=CPU"]),
            ("Vulkan0, experts on CPU", {"devices": ["Vulkan0"], "placement": "exps=CPU"},
             ["-dev", "Vulkan0", "-ot", "exps=CPU"]),
        ]
    rows = []
    for label, load_kwargs, bench_args in configs:
        check = placement_check(args.model, load_kwargs)
        row = compare(args.model, label, load_kwargs, bench_args, 99, args.reps, args.threads)
        rows.append({"model": args.model.name, **row, **check})
        # rewritten after each row: a call that runs out of time still brings back what it measured
        report = {"kind": f"vulkan-{args.kind}", "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                  "machine": machine(), "vulkan_module": vulkan_module(), "rows": rows}
        first = rows[0]
        report["greedy_common_prefix_with_first_row"] = {
            r["placement"]: common_prefix(first["greedy_tokens"], r["greedy_tokens"]) for r in rows}
        # what each placement costs against the first (CUDA0): llama-bench's tokens/s, this row over the first's
        report["llama_bench_over_first_row"] = {
            r["placement"]: {k: r["llama_bench_tps"][k] / first["llama_bench_tps"][k] for k in ("pp512", "tg128")}
            for r in rows}
        args.out.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
