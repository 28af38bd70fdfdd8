"""One table and one JSON from the budget_cap.py runs of the H200 (benchmarks/results/cap-*.json): every plan's
peak under the cap against its budget, and the speed ratios against llama-bench and the n_cpu_moe sweep.

    python benchmarks/budget_summary.py --out benchmarks/results/budget-cap-h200-summary.json

Speeds are llmplace's cold run (the process's first 512-token prompt, then 128 decoded tokens; 32 for the 70B)
and warm run (a second prompt of 512 new tokens in the same context, then 32 tokens); llama-bench's pp512 is
after its warm-up, so it compares with the warm prompt. Several runs of one case: their median."""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def cases(name: str) -> dict[str, list[dict]]:
    """label -> one dict per run: peak, planned total and runtime row, and the cold / warm speeds."""
    report = json.loads((RESULTS / name).read_text())
    rows: dict[str, list[dict]] = {}
    for case in report["cases"]:
        events = {e["stage"]: e for e in case["events"]}
        row = dict(peak_mib=case["peak_process_mib"], ok=case["returncode"] == 0, budget_mib=report["budget_mib"])
        if "fitted" in events:
            row.update(planned_mib=events["fitted"]["planned"] >> 20, runtime_mib=events["fitted"]["runtime"] >> 20,
                       plan=events["fitted"]["message"])
        if "cold_done" in events:
            row.update(cold_pp=events["cold_done"]["prompt_tps"], cold_tg=events["cold_done"]["decode_tps"],
                       warm_pp=events["warm_done"]["prompt_tps"], warm_tg=events["warm_done"]["decode_tps"])
        rows.setdefault(case["spec"]["label"], []).append(row)
    for bench in report["bench"]:
        rows.setdefault(f"llama-bench {bench['label']}", []).append(
            dict(peak_mib=bench["peak_process_mib"], ok=bench["returncode"] == 0, budget_mib=report["budget_mib"],
                 pp512=bench.get("pp512"), tg32=bench.get("tg32"), cmd=bench["cmd"]))
    return rows


def median(runs: list[dict], key: str) -> float | None:
    values = [r[key] for r in runs if r.get(key) is not None]
    return statistics.median(values) if values else None


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out")
    args = ap.parse_args()
    q4 = cases("cap-llama8b-q4_0.json")
    f16 = cases("cap-llama8b-f16.json")
    hot = cases("cap-llama8b-f16-hot.json")
    moe = cases("cap-qwen3-30b-a3b-q4_0.json")
    moe_reps = cases("cap-qwen3-30b-a3b-q4_0-reps.json")
    moe_front = cases("cap-qwen3-30b-a3b-q4_0-front.json")  # the fit taking experts from the first layers
    big = cases("cap-llama70b-q4_0.json")
    bandwidth = float((RESULTS / "host-bandwidth.txt").read_text().split()[4])

    table = []
    last, first = "Qwen3-30B-A3B shape Q4_0, ctx 4096, fit from the last layers", "... from the first layers"
    for model, runs_by_label in (("Llama-8B shape Q4_0", q4), ("Llama-8B shape F16", f16),
                                 ("Llama-8B shape F16", hot), (last, moe), (last, moe_reps), (first, moe_front),
                                 ("Llama-70B shape Q4_0", big)):
        for label, runs in runs_by_label.items():
            table.append(dict(model=model, case=label, runs=len(runs), budget_mib=runs[0]["budget_mib"],
                              peak_mib=max(r["peak_mib"] or 0 for r in runs), all_ok=all(r["ok"] for r in runs),
                              planned_mib=runs[0].get("planned_mib"), runtime_mib=runs[0].get("runtime_mib"),
                              cold_pp=median(runs, "cold_pp"), warm_pp=median(runs, "warm_pp"),
                              cold_tg=median(runs, "cold_tg"), warm_tg=median(runs, "warm_tg"),
                              pp512=median(runs, "pp512"), tg32=median(runs, "tg32")))

    f16_fit = f16["fit:mmap=0,ctx=1024"] + hot["fit:mmap=0,ctx=1024"]
    moe_fit_last = moe["fit"] + moe_reps["fit"]  # before: llama.cpp's fit, experts of the last layers
    moe_sweep16_before = moe["ncmoe=16"] + moe_reps["ncmoe=16"]
    moe_fit = moe_front["fit"]
    moe_sweep16 = moe_front["ncmoe=16"]
    big_fit = big["fit:mmap=0,ctx=1024,decode=32"]
    host_bytes_per_token = 34515 * 2**20  # the 70B plan's host weights (its loaded buffers), read once per token
    ratios = {
        "item3_f16_prompt_warm_vs_llama_bench_B_pp512": median(f16_fit, "warm_pp") / f16["llama-bench B"][0]["pp512"],
        "item3_f16_prompt_cold_vs_llama_bench_B_pp512": median(f16_fit, "cold_pp") / f16["llama-bench B"][0]["pp512"],
        "item3_f16_decode_vs_llama_bench_C_tg32": median(f16_fit, "cold_tg") / f16["llama-bench C"][0]["tg32"],
        "item3_f16_decode_vs_llama_bench_B_tg32": median(f16_fit, "cold_tg") / f16["llama-bench B"][0]["tg32"],
        "item3_q4_0_decode_vs_llama_bench_fitt_tg32": median(q4["fit:ctx=1024"], "cold_tg")
        / q4["llama-bench fitt"][0]["tg32"],
        "item3_q4_0_prompt_warm_vs_llama_bench_fitt_pp512": median(q4["fit:ctx=1024"], "warm_pp")
        / q4["llama-bench fitt"][0]["pp512"],
        "item4_f16_hot_first_vs_whole_layers_decode": median(hot["hot:mmap=0,ctx=1024"], "cold_tg")
        / median(hot["fit:mmap=0,ctx=1024"], "cold_tg"),
        "item4_f16_hot_first_vs_whole_layers_prompt_warm": median(hot["hot:mmap=0,ctx=1024"], "warm_pp")
        / median(hot["fit:mmap=0,ctx=1024"], "warm_pp"),
        "item5_moe_decode_fit_vs_best_sweep_point_in_cap_ncmoe16": median(moe_fit, "cold_tg")
        / median(moe_sweep16, "cold_tg"),
        "item5_moe_prompt_warm_fit_vs_ncmoe16": median(moe_fit, "warm_pp") / median(moe_sweep16, "warm_pp"),
        "item5_moe_decode_fit_vs_llama_bench_fitt_tg32":
            median(moe_fit, "cold_tg") / moe["llama-bench fitt"][0]["tg32"],
        "item5_before_moe_decode_last_layers_fit_vs_ncmoe16": median(moe_fit_last, "cold_tg")
        / median(moe_sweep16_before, "cold_tg"),
        "item5_before_moe_prompt_warm_last_layers_fit_vs_ncmoe16": median(moe_fit_last, "warm_pp")
        / median(moe_sweep16_before, "warm_pp"),
        "item6_70b_decode_vs_host_bandwidth_limit": median(big_fit, "cold_tg")
        / (bandwidth * 1e9 / host_bytes_per_token),
    }
    summary = dict(machine="1x NVIDIA H200 (143,771 MiB), 16 cores; a helper process held all but the budget",
                   host_read_bandwidth_gbs=bandwidth, table=table, ratios=ratios,
                   seventy_b=dict(ttft_cold_s=512 / median(big_fit, "cold_pp"),
                                  ttft_warm_s=512 / median(big_fit, "warm_pp"),
                                  decode_tps=median(big_fit, "cold_tg"),
                                  limit_tps=bandwidth * 1e9 / host_bytes_per_token))
    print("| model | plan | budget | peak (nvidia-smi) | planned (runtime) | prompt t/s cold / warm | decode t/s |")
    print("|---|---|---|---|---|---|---|")
    for row in table:
        if row["pp512"] is not None:
            speeds = f"{row['pp512']:.0f} (pp512) | {row['tg32']:.2f} (tg32)"
        elif row["cold_pp"] is not None:
            speeds = f"{row['cold_pp']:.0f} / {row['warm_pp']:.0f} | {row['cold_tg']:.2f}"
        else:
            speeds = "out of memory | -"
        planned = f"{row['planned_mib']:,} ({row['runtime_mib']})" if row["planned_mib"] else "-"
        runs = f" ×{row['runs']}" if row["runs"] > 1 else ""
        print(f"| {row['model']} | {row['case']}{runs} | {row['budget_mib']:,} | {row['peak_mib']:,} | {planned} | "
              f"{speeds} |")
    print()
    for key, value in ratios.items():
        print(f"{key}: {value:.2f}")
    print(json.dumps(summary["seventy_b"]))
    if args.out:
        Path(args.out).write_text(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
