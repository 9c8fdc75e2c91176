"""stop_regex helpers: SGLang's tail window, first-match trimming, streaming holdback, validation."""
from __future__ import annotations

import pytest

from radixlm.runtime.sampling_params import InvalidRequestError, SamplingParams
from radixlm.runtime.stop_regex import (
    MAX_PATTERN_CHARS,
    StopRegexes,
    StopRegexTooSlow,
    compile_stop_regexes,
    regex_holdback,
    trim_at_first_match,
    validate,
    validate_all,
)
from tests.runtime.helpers import assert_pool_idle, greedy_req, make_scheduler, run_to_completion


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


# Backtracks exponentially (Fibonacci) in `re` and `regex` alike on any text lacking \x01 and \x02.
BACKTRACKING = r"(?:[\s\S]|[\s\S]{2})+(?:\x01|\x02)"


def test_a_backtracking_search_stops_at_its_budget() -> None:
    with pytest.raises(StopRegexTooSlow, match="stop_regex"):
        compile_stop_regexes((r"\d{7}", BACKTRACKING)).search("x" * 80, budget_s=0.002)
    assert regex_holdback("x" * 80, (BACKTRACKING,)) == 0
    assert trim_at_first_match("x" * 80, (BACKTRACKING,)) == "x" * 80


def test_validate_refuses_deep_nesting_and_long_patterns_by_reason() -> None:
    assert "nests groups too deeply" in validate("(" * 3000 + "a" + ")" * 3000)
    assert f"at most {MAX_PATTERN_CHARS}" in validate("a" * (MAX_PATTERN_CHARS + 1))
    assert "in all" in validate_all(["b" * (MAX_PATTERN_CHARS // 2 + 1)] * 2)
    assert validate_all([r"\d+", "end"]) is None


def test_sampling_params_name_stop_regex_for_too_long_patterns() -> None:
    with pytest.raises(InvalidRequestError) as err:
        SamplingParams.from_dict({"stop_regex": ["q" * 5000, "r" * 5000]})
    assert err.value.field == "sampling_params.stop_regex"


@pytest.mark.timeout(600)
def test_a_backtracking_stop_regex_fails_its_request_not_the_loop(tiny_model_dir) -> None:
    """The request is finished with a 400 naming stop_regex after one budget; the other request
    completes and the pool is whole (before: the scheduler's thread searched for hours)."""
    sched = make_scheduler(tiny_model_dir("llama"))
    bad = greedy_req("bad", [5, 6, 7, 8], 60, stop_regex=(BACKTRACKING,))
    good = greedy_req("good", [9, 10, 11], 8)
    out = run_to_completion(sched, [bad, good], timeout_s=300)
    reason = out["bad"]["finished_reason"]
    assert reason["type"] == "abort" and reason["status_code"] == 400 and "stop_regex" in reason["message"]
    assert len(out["good"]["output_ids"]) == 8
    assert_pool_idle(sched)


class _Preempted:
    """A pattern whose first search times out without using the CPU (the thread was preempted)."""

    pattern = "late"

    def __init__(self) -> None:
        self.calls = 0

    def search(self, text: str, timeout: float) -> bool:
        self.calls += 1
        if self.calls == 1:
            raise TimeoutError("regex timed out")
        return "late" in text


def test_a_preempted_search_is_retried_not_taken_for_backtracking() -> None:
    pattern = _Preempted()
    assert StopRegexes((pattern,), None).search("too late") == "late" and pattern.calls == 2


class _Spent:
    """A pattern whose search uses up the budget (its timeout fires)."""

    pattern = "spent"

    def __init__(self, log: list[str]) -> None:
        self.log = log

    def search(self, text: str, timeout: float) -> None:
        self.log.append("search")
        raise TimeoutError("regex timed out")

    def finditer(self, text: str, partial: bool, timeout: float):
        self.log.append("finditer")
        raise TimeoutError("regex timed out")


def test_the_fronts_trim_and_holdback_share_one_budget_across_patterns(monkeypatch) -> None:
    """Hundreds of backtracking patterns must not take one budget each on the front's event loop."""
    import radixlm.runtime.stop_regex as stop_regex

    log: list[str] = []
    monkeypatch.setattr(stop_regex, "compile_stop_regexes", lambda patterns: StopRegexes(
        tuple(_Spent(log) for _ in patterns), None))
    assert trim_at_first_match("text", ("a", "b", "c")) == "text" and log == ["search"]
    log.clear()
    assert regex_holdback("text", ("a", "b", "c")) == 0 and log == ["finditer"]
