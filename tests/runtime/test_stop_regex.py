"""stop_regex helpers: SGLang's tail window, first-match trimming, streaming holdback, validation."""
from __future__ import annotations

import pytest

from radixlm.runtime.stop_regex import compile_stop_regexes, regex_holdback, trim_at_first_match, validate


@pytest.mark.parametrize("pattern, window", [
    (r"ab|cde", 4), (r"(x){2,3}", 4), (r"[a-z]\.", 3), (r"^END$", 4), (r"(?=a)b", 2), (r"\d+", None), (r"(a)\1", None),
])
def test_window_is_longest_match_plus_one_token(pattern: str, window: int | None) -> None:
    assert compile_stop_regexes((pattern,)).window_tokens == window


def test_search_returns_the_pattern_as_sent() -> None:
    regexes = compile_stop_regexes(("zz", r"and|or"))
    assert regexes.search("cats and dogs") == r"and|or" and regexes.search("cats") is None


def test_trim_cuts_at_the_earliest_match_of_any_pattern() -> None:
    assert trim_at_first_match("hello 123 world", (r"wor", r"\d+")) == "hello "
    assert trim_at_first_match("no match", (r"\d",)) == "no match"


def test_holdback_keeps_back_what_could_grow_into_a_match() -> None:
    assert regex_holdback("hello wo", ("world",)) == 2
    assert regex_holdback("hello", ("world",)) == 0
    assert regex_holdback("x = 12", (r"\d{3}",)) == 2


def test_validate_refuses_bad_and_empty_matching_patterns() -> None:
    assert validate(r"[.!?]\s*$") is None
    assert "not a valid regular expression" in validate("(")
    assert "empty string" in validate("a*")
