"""Random walks: sample allowed tokens (seeded) until EOS is allowed, then validate the JSON."""

from __future__ import annotations

import json
import random
import zlib
from typing import Any

import pytest

from radixlm import constrained as C

from .schema_corpus import BY_NAME
from .test_corpus import validator
from .test_regex_ebnf import random_walk

WALKED = ["user_create", "order_create", "search_request", "create_calendar_event", "kv_set", "feature_flags",
          "ci_pipeline", "tree_recursive", "expression_tree", "linked_list", "filesystem", "shape_oneof",
          "tuple_prefix_items", "enum_mixed_types", "integer_bounds_negative", "number_bounds", "multiple_of_int",
          "date_formats", "network_interface", "min_max_properties", "chat_message", "allof_merge"]


@pytest.mark.parametrize("name", WALKED)
def test_random_walk_validates(tokenizer: Any, name: str) -> None:
    _, schema, _, _ = BY_NAME[name]
    grammar = C.compile(tokenizer, json_schema=schema)
    check = validator(schema)
    rng = random.Random(zlib.crc32(name.encode()))  # not hash(): it changes with PYTHONHASHSEED
    done = 0
    for _ in range(8):
        data = random_walk(grammar, rng, max_steps=500, prefer=b'"]},@', stop_prob=1.0)
        if data is None:
            continue
        doc = json.loads(data.decode("utf-8"))
        errors = [e.message for e in check.iter_errors(doc)]
        assert not errors, (data, errors)
        done += 1
    assert done >= 2, "random walks did not terminate"


def test_random_walk_outlines_backend(tokenizer: Any) -> None:
    schema = BY_NAME["chat_message"][1]
    grammar = C.compile(tokenizer, json_schema=schema, backend="outlines")
    rng = random.Random(3)
    for _ in range(8):
        data = random_walk(grammar, rng, max_steps=500, prefer=b'"]},@', stop_prob=1.0)
        assert data is not None
        assert validator(schema).is_valid(json.loads(data.decode("utf-8"))), data
