"""schema_number_gap's terminal against `jsonschema` on seeded random number texts: never looser;
stricter only on integers, exponent forms, trailing zeros and over 15 digits written (constrained/README.md)."""

from __future__ import annotations

import json
import random
import re
from decimal import Decimal

import jsonschema
import pytest

from radixlm.constrained.schema_negation import Unsupported
from radixlm.constrained.schema_number_gap import gap_terminal, unit_interval

RANGES = [{"exclusiveMinimum": 0, "maximum": 0.5}, {"exclusiveMinimum": 3, "exclusiveMaximum": 3.25},
          {"minimum": -1.5, "exclusiveMaximum": -1}, {"minimum": 0.25, "maximum": 0.75},
          {"exclusiveMinimum": 0.1, "exclusiveMaximum": 0.100001}, {"minimum": 2.5, "maximum": 3},
          {"minimum": -0.5, "exclusiveMaximum": 0}, {"exclusiveMinimum": -2, "maximum": -1.75},
          {"minimum": 0.5, "maximum": 0.5}, {"exclusiveMinimum": 12, "maximum": 12.000000000001},
          {"exclusiveMinimum": 0, "maximum": 0.5, "minimum": 0.125, "exclusiveMaximum": 0.5}]


def _texts(rng: random.Random, low: float) -> list[str]:
    out = []
    for _ in range(4000):
        width = rng.choice([2.0, 0.01, 1e-9])
        digits = rng.randint(0, 16)
        x = Decimal(repr(rng.uniform(low - width, low + 2 * width))).quantize(Decimal(1).scaleb(-digits))
        out.append(format(x, "f"))
    return out + ["0", "-0", "0.0", "1", "-1", "3", "12", "0.5", "0.50", "-1.5", "0.5e0"]


@pytest.mark.parametrize("bounds", RANGES)
def test_gap_terminal_matches_jsonschema(bounds: dict) -> None:
    regex = re.compile(gap_terminal(bounds)[1:-1])
    validator = jsonschema.Draft202012Validator({"type": "number", **bounds})
    rng = random.Random(json.dumps(bounds))
    accepted = 0
    for text in _texts(rng, min(bounds.values())):
        took, valid = bool(regex.fullmatch(text)), validator.is_valid(json.loads(text))
        assert not took or valid, text  # never looser
        written = len(text.lstrip("-").replace(".", ""))
        if valid and not float(json.loads(text)).is_integer() and "e" not in text and written <= 15 \
                and not text.endswith("0"):
            assert took, text  # stricter only where documented
        accepted += took
    assert accepted >= 20 or max(bounds.values()) - min(bounds.values()) < 0.01, accepted  # not vacuous


def test_gap_terminal_shapes() -> None:
    assert gap_terminal({"exclusiveMinimum": 0, "maximum": 1}) is None  # integer bounds: other routes
    assert gap_terminal({"exclusiveMinimum": 0.5, "maximum": 1.5}) is None  # an integer inside
    assert gap_terminal({"exclusiveMinimum": 0.5}) is None
    assert gap_terminal({"exclusiveMinimum": 0.5, "exclusiveMaximum": 0.5}) == ""  # nothing there
    assert unit_interval({"minimum": -1.5, "exclusiveMaximum": -1}) == ("-", 1, ("", True), ("5", False))
    with pytest.raises(Unsupported):
        gap_terminal({"exclusiveMinimum": 0, "maximum": 0.12345678901234567})
