"""PNG figures from benchmarks/results/*.json, for the results a reader would rather see than read.

    pip install matplotlib   # a benchmark-only dependency, not one of radixlm's
    python benchmarks/plots.py [--results benchmarks/results] [--out benchmarks/plots]

Each figure reads the result files named in it and is skipped (with a note) when one is missing,
so the script runs on a checkout with only some results. Ratios are only ever drawn from two
numbers of the same run (the file each comes from is printed on the figure).
"""
from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402

ROOT = Path(__file__).resolve().parent
BLUE, GREY, ORANGE, GREEN = "#2f6fed", "#9aa3b2", "#f08c2e", "#2e9e5b"


def _load(results: Path, name: str) -> dict[str, Any]:
    return json.loads((results / name).read_text())


def h200_speedups(results: Path) -> plt.Figure:
    """Side-by-side ratios measured on the H200 (each pair from one run)."""
    suite = _load(results, "gpu_suite-h200.json")
    thr = _load(results, "gpu_suite-h200-throughput-2.json")
    serve = _load(results, "gpu_suite-h200-g-a.json")
    tp = _load(results, "scale_out_tp-h200x2.json")
    dp = _load(results, "scale_out_dp-h200x2.json")
    con = _load(results, "gpu_suite-h200-f-final.json")
    rows = [
        ("batch-1 decode: radixlm / transformers", suite["engine"]["a_decode_tok_s"] / suite["transformers"]["decode_tok_s"],
         "gpu_suite-h200"),
        ("shared prefixes: radix cache on / off (req/s)", thr["e"]["speedup_on_vs_off"], "gpu_suite-h200-throughput-2"),
        ("300 requests: HTTP server / in-process Engine", serve["g"]["server_vs_engine"], "gpu_suite-h200-g-a"),
        ("batch-1 decode: TP=2 / TP=1 (2 GPUs)", tp["tp2"]["a_decode_tok_s"] / tp["tp1"]["a_decode_tok_s"],
         "scale_out_tp-h200x2"),
        ("DP=2 req/s: cache-aware / round-robin routing",
         dp["c"]["cache_aware"]["requests_per_s"] / dp["c"]["round_robin"]["requests_per_s"], "scale_out_dp-h200x2"),
        ("64 requests tok/s: JSON schema / unconstrained", con["f"]["constrained_vs_unconstrained_tok_s"],
         "gpu_suite-h200-f-final"),
    ]
    fig, ax = plt.subplots(figsize=(9, 4.2))
    labels = [f"{name}\n({src}.json)" for name, _, src in rows]
    values = [v for _, v, _ in rows]
    bars = ax.barh(labels, values, color=[BLUE if v >= 1 else ORANGE for v in values])
    ax.axvline(1.0, color="#333", linewidth=0.8)
    ax.set_xscale("log")
    ax.bar_label(bars, labels=[f"{v:.2f}×" for v in values], padding=3, fontsize=9)
    ax.invert_yaxis()
    ax.tick_params(axis="y", labelsize=8)
    ax.set_xlabel("ratio (log scale; 1 = equal)")
    ax.set_title("H200: side-by-side ratios (Llama-3.1-8B shape, random bf16 weights)")
    ax.set_xlim(0.1, 40)
    return fig


def h200_throughput(results: Path) -> plt.Figure:
    """Offline throughput of the two H200 throughput runs against the roofline of the same run."""
    fig, ax = plt.subplots(figsize=(7, 3.6))
    names, measured, roof = [], [], []
    for name in ("gpu_suite-h200-throughput.json", "gpu_suite-h200-throughput-2.json"):
        data = _load(results, name)
        names.append(f"{data.get('commit') or '(no commit)'}\n{name}")
        measured.append(data["b"]["total_tok_s"] / 1000)
        roof.append(data["b"]["roofline_tok_s"] / 1000)
    x = range(len(names))
    ax.bar([i - 0.2 for i in x], measured, 0.4, label="radixlm total tok/s", color=BLUE)
    ax.bar([i + 0.2 for i in x], roof, 0.4, label="matmul roofline (same run)", color=GREY)
    for i, (m, r) in enumerate(zip(measured, roof)):
        ax.text(i - 0.2, m, f"{m:.1f}k\n{m / r:.0%}", ha="center", va="bottom", fontsize=9)
    ax.set_xticks(list(x), names, fontsize=8)
    ax.set_ylabel("thousand tokens / s")
    ax.set_ylim(0, max(roof) * 1.25)
    ax.set_title("H200 offline throughput (item b), Llama-3.1-8B shape")
    ax.legend(fontsize=8, loc="upper left")
    return fig


def batch_sweep(results: Path, preset: str) -> plt.Figure:
    """Decode throughput and step time against batch size (benchmarks/batch_sweep.py)."""
    data = _load(results, f"batch_sweep-{preset}.json")
    batches = [p["batch"] for p in data["points"]]
    fig, ax = plt.subplots(figsize=(7, 3.6))
    ax.plot(batches, [p["decode_tok_s"] for p in data["points"]], "o-", color=BLUE, label="decode tok/s")
    ax.set_xscale("log", base=2)
    ax.set_xticks(batches, [str(b) for b in batches])
    ax.set_xlabel("requests decoding together (batch)")
    ax.set_ylabel("decode tokens / s", color=BLUE)
    ax.set_ylim(bottom=0)
    step = ax.twinx()
    step.plot(batches, [p["decode_ms_per_step"] for p in data["points"]], "s--", color=ORANGE, label="ms per step")
    step.set_ylabel("ms per decode step", color=ORANGE)
    step.set_ylim(bottom=0)
    cfg = data["config"]
    ax.set_title(f"Throughput vs batch, {data['device']} ({preset} preset: {cfg['input_len']}-token prompts, "
                 f"{cfg['output_len']} new), {data['date']} {data['commit']}", fontsize=9)
    return fig


def serving_latency(results: Path) -> plt.Figure:
    """Latency percentiles of the serving benchmark (CPU, default model)."""
    data = _load(results, "serving.json")
    server = data["server"]
    metrics = [("TTFT", "ttft_ms"), ("TPOT", "tpot_ms"), ("ITL", "itl_ms"), ("E2E", "e2e_ms")]
    stats = [("median", GREEN), ("p90", BLUE), ("p99", ORANGE)]
    fig, ax = plt.subplots(figsize=(7, 3.6))
    width = 0.25
    for j, (stat, color) in enumerate(stats):
        xs = [i + (j - 1) * width for i in range(len(metrics))]
        ys = [server[key][stat] for _, key in metrics]
        ax.bar(xs, ys, width, label=stat, color=color)
    ax.set_yscale("log")
    ax.set_xticks(range(len(metrics)), [m for m, _ in metrics])
    ax.set_ylabel("milliseconds (log scale)")
    cfg = data["config"]
    ax.set_title(f"Serving latency, CPU ({data['machine'].get('cpus', '?')} cores), default model: "
                 f"{cfg['num_requests']} requests {cfg['input_len']}→{cfg['output_len']} tokens at once", fontsize=9)
    ax.legend(fontsize=8)
    return fig


def constrained_backends(results: Path) -> plt.Figure:
    """Grammar backends on our JSON-schema corpus: coverage, compile time, mask time."""
    data = _load(results, "constrained.json")
    backends = list(data["backends"])
    fig, axes = plt.subplots(1, 3, figsize=(10, 3.4))
    colors = [BLUE, GREY, ORANGE][: len(backends)]
    rates = [data["backends"][b]["pass_rate"] * 100 for b in backends]
    bars = axes[0].bar(backends, rates, color=colors)
    axes[0].bar_label(bars, labels=[f"{r:.0f}%" for r in rates], fontsize=8)
    axes[0].set_ylim(0, 110)
    axes[0].set_title("schemas passed", fontsize=10)
    for ax, key, unit, title in ((axes[1], "compile_ms", "ms", "compile time"), (axes[2], "mask_us", "µs", "mask per token")):
        for j, stat in enumerate(("p50", "p99")):
            xs = [i + (j - 0.5) * 0.38 for i in range(len(backends))]
            ax.bar(xs, [data["backends"][b][key][stat] for b in backends], 0.38, label=stat,
                   color=[GREEN, ORANGE][j])
        ax.set_yscale("log")
        ax.set_xticks(range(len(backends)), backends)
        ax.set_ylabel(unit)
        ax.set_title(title, fontsize=10)
        ax.legend(fontsize=7)
    corpus = data["backends"][backends[0]]["corpus"]
    fig.suptitle(f"Constrained decoding backends, {corpus}-schema corpus (constrained.json)", fontsize=10)
    return fig


FIGURES: dict[str, Callable[[Path], plt.Figure]] = {
    "h200_speedups.png": h200_speedups,
    "h200_throughput.png": h200_throughput,
    "serving_latency_cpu.png": serving_latency,
    "batch_sweep_cpu.png": lambda results: batch_sweep(results, "cpu"),
    "batch_sweep_gpu.png": lambda results: batch_sweep(results, "gpu"),
    "constrained_backends.png": constrained_backends,
}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--results", type=Path, default=ROOT / "results")
    ap.add_argument("--out", type=Path, default=ROOT / "plots")
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    for name, draw in FIGURES.items():
        try:
            fig = draw(args.results)
        except (FileNotFoundError, KeyError) as exc:
            print(f"skip {name}: {type(exc).__name__}: {exc}")
            continue
        fig.tight_layout()
        fig.savefig(args.out / name, dpi=110)
        plt.close(fig)
        print(f"wrote {args.out / name}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
