"""Corpus: every valid document is accepted token by token, every invalid one rejected."""

from __future__ import annotations

import copy
import json
import re
from typing import Any

import jsonschema
import pytest

from radixlm import constrained as C

from .conftest import encode, run_tokens
from .schema_corpus import CORPUS

# jsonschema checks "uri" and RFC 3339 "time" only with optional packages; stand-ins here.
_URI = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:[^\s]+$")
_TIME = re.compile(r"^([01][0-9]|2[0-3]):[0-5][0-9]:([0-5][0-9]|60)(\.[0-9]+)?([Zz]|[+-]([01][0-9]|2[0-3]):[0-5][0-9])$")


def validator(schema: Any) -> jsonschema.Draft202012Validator:
    checker = copy.deepcopy(jsonschema.Draft202012Validator.FORMAT_CHECKER)
    checker.checks("uri")(lambda value: not isinstance(value, str) or bool(_URI.match(value)))
    checker.checks("time")(lambda value: not isinstance(value, str) or bool(_TIME.match(value)))
    return jsonschema.Draft202012Validator(schema, format_checker=checker)


def renderings(doc: Any, ascii_escapes: bool = True) -> list[str]:
    """Compact-with-spaces, pretty-printed, \\u-escaped and raw-UTF-8 spellings of a document."""
    out = [json.dumps(doc, ensure_ascii=ascii_escapes), json.dumps(doc, ensure_ascii=False, separators=(",", ":"))]
    if isinstance(doc, (dict, list)) and doc:
        out.append(json.dumps(doc, indent=2, ensure_ascii=ascii_escapes))
    return out


def test_corpus_size_and_labels() -> None:
    assert len(CORPUS) >= 100
    for name, schema, valid, invalid in CORPUS:
        v = validator(schema)
        for doc in valid:
            assert v.is_valid(doc), (name, doc)
        for doc in invalid:
            assert not v.is_valid(doc), (name, doc)


def check_entry(tokenizer: Any, grammar: C.Grammar, valid: list[Any], invalid: list[Any],
                ascii_escapes: bool = True) -> None:
    eos = tokenizer.eos_token_id
    bitmask = C.allocate_token_bitmask(1, grammar.info.vocab_size)
    for doc in valid:
        for text in renderings(doc, ascii_escapes):
            m = grammar.matcher()
            for tid in encode(tokenizer, text):
                m.fill_next_token_bitmask(bitmask, 0)
                assert (int(bitmask[0, tid >> 5]) >> (tid & 31)) & 1, f"mask forbids {tid} in {text!r}"
                assert m.advance(tid), f"rejected valid {text!r} at token {tid}"
            assert m.is_accepting(), f"valid {text!r} not accepting"
            m.fill_next_token_bitmask(bitmask, 0)
            assert (int(bitmask[0, eos >> 5]) >> (eos & 31)) & 1, "EOS not allowed at the end"
            assert m.advance(eos) and m.is_terminated()
    for doc in invalid:
        text = json.dumps(doc)
        assert not run_tokens(grammar.matcher(), encode(tokenizer, text)), f"accepted invalid {text!r}"


@pytest.mark.parametrize("entry", CORPUS, ids=[e[0] for e in CORPUS])
def test_corpus_default_backend(tokenizer: Any, entry: tuple[str, Any, list[Any], list[Any]]) -> None:
    name, schema, valid, invalid = entry
    grammar = C.compile(tokenizer, json_schema=schema)
    check_entry(tokenizer, grammar, valid, invalid)


# outlines-core builds a token table per DFA state at compile time (~0.1-1 s each on this
# vocabulary), so only a sample runs here; benchmarks/constrained.py covers the whole corpus.
OUTLINES_SAMPLE = ["get_weather", "login_request", "nullable_fields", "optional_only", "chat_message",
                   "enum_mixed_types", "string_lengths", "unicode_strings"]


@pytest.mark.parametrize("name", OUTLINES_SAMPLE)
def test_corpus_outlines_sample(tokenizer: Any, name: str) -> None:
    entry = next(e for e in CORPUS if e[0] == name)
    grammar = C.compile(tokenizer, json_schema=entry[1], backend="outlines")
    check_entry(tokenizer, grammar, entry[2], entry[3], ascii_escapes=False)  # outlines: no \\uXXXX
