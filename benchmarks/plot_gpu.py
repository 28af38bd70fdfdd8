"""The README's GPU picture from the committed results JSON of benchmarks/gpu_suite.py (needs matplotlib).

    python benchmarks/plot_gpu.py [--out docs/gpu-benchmarks.png]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

RESULTS = Path(__file__).parent / "results"


def bars(ax, labels, ours, ref, title, ylabel):
    import numpy as np

    x = np.arange(len(labels))
    ax.bar(x - 0.2, ref, 0.4, label="llama-bench", color="#9aa5b1")
    ax.bar(x + 0.2, ours, 0.4, label="llmplace", color="#2f6fb0")
    for i, (o, r) in enumerate(zip(ours, ref)):
        ax.annotate(f"{o / r:.2f}×", (i + 0.2, o), ha="center", va="bottom", fontsize=8)
    ax.set_xticks(x, labels, rotation=30, ha="right", fontsize=8)
    ax.set_title(title, fontsize=10)
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=8)


def main() -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=Path("docs/gpu-benchmarks.png"))
    args = ap.parse_args()
    placements = []
    for name in ("gpu-h100-placements-llama8b-q4_0.json", "gpu-h100-placements-qwen3-30b-a3b-q4_0.json"):
        placements += json.loads((RESULTS / name).read_text())["rows"]
    split = json.loads((RESULTS / "gpu-2xh200-split-llama70b-q4_0.json").read_text())["rows"]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    bars(axes[0], [f"{r['model'].split('.')[0]}\n{r['placement']}" for r in placements],
         [r["llmplace_tps"]["tg128_generate"] for r in placements], [r["llama_bench_tps"]["tg128"] for r in placements],
         "H100: decode (128 tokens, greedy) by placement", "tokens/s")
    bars(axes[1], [r["placement"] for r in split], [r["llmplace_tps"]["tg128_generate"] for r in split],
         [r["llama_bench_tps"]["tg128"] for r in split], "2 × H200: Llama-70B-shaped Q4_0 decode by split", "tokens/s")
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
