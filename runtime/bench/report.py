"""Shared pieces of the bench commands: latency statistics, the summary table, the JSON record."""
from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import time
from pathlib import Path
from typing import Any

WIDTH = 50


def latency_stats(values: list[float], scale: float = 1000.0) -> dict[str, float]:
    """mean / median / std / p90 / p99 / max of `values` (seconds) in ms; {} when empty."""
    if not values:
        return {}
    v = sorted(x * scale for x in values)

    def pct(p: float) -> float:
        return v[min(len(v) - 1, max(0, round(p / 100 * (len(v) - 1))))]

    return {"mean": statistics.fmean(v), "median": statistics.median(v), "std": statistics.pstdev(v),
            "p90": pct(90), "p99": pct(99), "max": v[-1]}


Section = tuple[str | None, list[tuple[str, Any]]]


def summary_table(title: str, sections: list[Section]) -> str:
    """The layout of SGLang's bench_serving summary: a titled box, label / value rows, ruled sections."""
    lines = [f" {title} ".center(WIDTH, "=")]
    for heading, rows in sections:
        if heading:
            lines.append(f"{heading}".center(WIDTH, "-"))
        for label, value in rows:
            if isinstance(value, float):
                value = f"{value:.2f}"
            lines.append(f"{label + ':':<40} {value:<10}")
    lines.append("=" * WIDTH)
    return "\n".join(lines)


def latency_section(name: str, label: str, stats: dict[str, float]) -> list[Section]:
    if not stats:
        return []
    return [(name, [(f"Mean {label} (ms)", stats["mean"]), (f"Median {label} (ms)", stats["median"]),
                    (f"P99 {label} (ms)", stats["p99"])])]


def write_record(path: str | None, kind: str, config: dict[str, Any], results: dict[str, Any]) -> None:
    """The run as JSON: what ran (config, machine, commit, date) and what it measured."""
    if not path:
        return
    commit = ""
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).resolve().parent, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    config = {k: ("<set>" if k == "api_key" and v else "inf" if v == float("inf") else v) for k, v in config.items()}
    record = {"benchmark": kind, "config": config,
              "machine": {"platform": platform.platform(), "python": platform.python_version(),
                          "cpus": os.cpu_count()},
              "commit": commit or None, "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S"), "results": results}
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2, default=str) + "\n")
    print(f"wrote {out}")
