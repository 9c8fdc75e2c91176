"""A fixed sample of real-world schemas (tests/constrained/data/maskbench_sample), scored by
MaskBench's rule: every valid instance accepted token by token, every invalid one rejected.
The full dev set runs in benchmarks/schema_coverage.py, not here."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from radixlm import constrained as C

from .conftest import encode, run_tokens

SAMPLE = sorted((Path(__file__).parent / "data" / "maskbench_sample").glob("*.json"))


@pytest.mark.parametrize("path", SAMPLE, ids=[p.stem for p in SAMPLE])
def test_real_world_schema_passes(tokenizer: Any, path: Path) -> None:
    case = json.loads(path.read_text())
    grammar = C.compile(tokenizer, json_schema=case["schema"], cache=None)
    for test in case["tests"]:
        text = json.dumps(test["data"], ensure_ascii=False)
        assert run_tokens(grammar.matcher(), encode(tokenizer, text)) == test["valid"], text[:200]
