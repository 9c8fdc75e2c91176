"""benchmarks/f_pooled.py: item (f)'s repeated pairs pooled per card, rows and arm over Engines and reports."""
from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

from f_pooled import arm_of, pooled  # noqa: E402


def _run(batch: int, json_tok_s: list[float], same_tok_s: list[float]) -> dict:
    """One Engine's (f) result as gpu_throughput.repeat_pairs reports it."""
    return {"batch": batch, "repeats": {
        "tok_s": {"json_schema": json_tok_s, "unconstrained_same_lengths": same_tok_s},
        "pair_ratios": [j / s for j, s in zip(json_tok_s, same_tok_s)],
        "constrained_vs_same_lengths_tok_s_medians": statistics.median(json_tok_s) / statistics.median(same_tok_s)}}


def test_arms_named_from_result_keys() -> None:
    assert arm_of("batch_64_state_table_auto") == "defaults"
    assert arm_of("batch_256_state_table_auto#2") == "defaults"
    assert arm_of("batch_64_state_table_auto_enable_overlap_constrained_prefill#2") == "enable_overlap_constrained_prefill"
    assert arm_of("batch_256_state_table_auto_RADIXLM_SAMPLING_BEFORE_TOKENS=0") == "RADIXLM_SAMPLING_BEFORE_TOKENS=0"


def test_engines_of_one_arm_pooled_across_reports(tmp_path: Path) -> None:
    first = {"device": "NVIDIA H200", "f": {
        "batch_64_state_table_auto": _run(64, [99.0, 98.0, 100.0], [100.0, 100.0, 100.0]),
        "batch_64_state_table_auto_enable_overlap_constrained_prefill": _run(64, [101.0, 103.0], [100.0, 100.0]),
        "wall_s": 1.0}}
    second = {"device": "NVIDIA H200", "f": {"batch_64_state_table_auto#2": _run(64, [90.0], [100.0])}}
    paths = []
    for i, report in enumerate((first, second)):
        paths.append(tmp_path / f"r{i}.json")
        paths[-1].write_text(json.dumps(report))
    got = pooled(paths)
    assert sorted(got) == [("NVIDIA H200", 64, "defaults"), ("NVIDIA H200", 64, "enable_overlap_constrained_prefill")]
    defaults = got[("NVIDIA H200", 64, "defaults")]
    assert [round(m, 3) for _, m, _ in defaults] == [0.99, 0.9]  # each Engine's median over median
    assert [len(pairs) for _, _, pairs in defaults] == [3, 1]
    assert round(got[("NVIDIA H200", 64, "enable_overlap_constrained_prefill")][0][1], 3) == 1.02
