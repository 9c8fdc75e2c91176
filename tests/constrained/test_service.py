"""GrammarService: compiles in a killable worker process; the caller only polls."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import pytest

from radixlm import constrained as C
from radixlm.constrained.service import GrammarService

from .conftest import encode, run_tokens

SLOW_REGEX = "[a-z]{0,60000}!"  # outlines-core: ~60k DFA states x 49k tokens, about a minute (6,000 took 6.4 s
# here and under 8 s on CI, so the timeout tests failed there); the tests kill it at their timeout


@pytest.fixture(scope="module")
def service(tokenizer: Any, tokenizer_dir: Path) -> Any:
    # uncapped: the timeout test's slow compile must meet its timeout, not a small CI machine's memory cap
    svc = GrammarService(str(tokenizer_dir), tokenizer=tokenizer, timeout_s=3.0, cache=C.GrammarCache(),
                         memory_limit=None)
    yield svc
    svc.close()


def test_service_compiles_and_reports_errors(service: GrammarService, tokenizer: Any) -> None:
    schema = {"type": "object", "properties": {"n": {"type": "integer", "maximum": 9}}, "required": ["n"]}
    service.submit("ok", {"json_schema": schema})
    service.submit("same", {"json_schema": schema})  # deduplicated with "ok"
    service.submit("regex", {"regex": "(yes|no)", "backend": "outlines"})
    service.submit("ebnf", {"ebnf": 'root ::= "a"+'})
    service.submit("bad", {"json_schema": {"type": "array", "contains": {"const": 1}, "maxContains": 1}})
    service.submit("contains", {"json_schema": {"type": "array", "contains": {"const": 1}}})  # Lark, %json leaves
    service.submit("unique", {"json_schema": {"type": "array", "uniqueItems": True}})  # checked beside the grammar
    service.submit("broken", {"regex": "(unclosed"})
    service.submit("two", {"regex": "a", "choices": ["a"]})
    start = time.monotonic()
    results = dict(service.wait(timeout_s=120))
    assert time.monotonic() - start < 120
    assert set(results) == {"ok", "same", "regex", "ebnf", "bad", "broken", "two", "unique", "contains"}
    assert results["ok"] is results["same"]
    assert run_tokens(results["ok"].matcher(), encode(tokenizer, '{"n": 7}'))
    assert not run_tokens(results["ok"].matcher(), encode(tokenizer, '{"n": 10}'))
    assert run_tokens(results["regex"].matcher(), encode(tokenizer, "no"))
    assert run_tokens(results["ebnf"].matcher(), encode(tokenizer, "aaa"))
    assert isinstance(results["bad"], C.UnsupportedSchemaError)
    assert run_tokens(results["contains"].matcher(), encode(tokenizer, "[0, 1]"))  # rebuilt from its payload
    assert not run_tokens(results["contains"].matcher(), encode(tokenizer, "[0, 2]"))
    assert not run_tokens(results["unique"].matcher(), encode(tokenizer, '[{"a": 1}, {"a": 1}]'))  # rebuilt from its payload
    assert run_tokens(results["unique"].matcher(), encode(tokenizer, '[{"a": 1}, {"a": 2}]'))
    assert isinstance(results["broken"], C.GrammarCompileError)
    assert isinstance(results["two"], ValueError)
    # now a cache hit: answered by submit itself (no worker, nothing queued, nothing for the next poll)
    assert service.submit("again", {"json_schema": schema}) is results["ok"]
    assert service.pending() == 0 and service.poll() == []


def test_service_timeout_restarts_worker(service: GrammarService, tokenizer: Any) -> None:
    service.submit("slow", {"regex": SLOW_REGEX, "backend": "outlines"})
    service.submit("after", {"regex": "[0-9]+x"})
    polls = 0
    results: dict[Any, Any] = {}
    deadline = time.monotonic() + 60
    while service.pending() and time.monotonic() < deadline:
        t0 = time.perf_counter()
        for key, value in service.poll():
            results[key] = value
        assert time.perf_counter() - t0 < 0.5  # poll never blocks on the compile
        polls += 1
        time.sleep(0.01)
    assert isinstance(results["slow"], C.GrammarCompileError)
    assert "timed out after 3 s" in str(results["slow"])
    assert service.restarts >= 1
    assert run_tokens(results["after"].matcher(), encode(tokenizer, "123x"))


def test_service_rejects_a_different_tokenizer(tokenizer: Any, tmp_path: Path) -> None:
    """The worker's vocabulary must be the caller's, or token ids would be misread."""
    import transformers

    other = tmp_path / "other"
    clone = transformers.AutoTokenizer.from_pretrained(tokenizer.name_or_path)
    clone.add_tokens(["<zz_extra_token>"])
    clone.save_pretrained(other)
    with GrammarService(str(other), tokenizer=tokenizer, timeout_s=30, cache=C.GrammarCache()) as svc:
        svc.submit("k", {"regex": "a+"})
        (key, result), = svc.wait(timeout_s=120)
    assert key == "k" and isinstance(result, C.GrammarCompileError) and "differs" in str(result)


def test_service_vets_schemas_in_the_worker_not_the_caller(tokenizer: Any, tokenizer_dir: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """A schema's vetting and rewriting (up to a second for real schemas, unbounded for hostile ones)
    runs in the killable worker: the caller — the scheduler's loop — never reads the schema. With the
    caller's vetting broken on purpose (the spawned worker imports its own, intact), refusals still
    come back naming keyword and pointer, and one schema sent as an object and as indented text compiles
    to the same grammar."""
    from radixlm.constrained import compiler, schema

    def broken(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("schema vetted in the caller's process")

    monkeypatch.setattr(schema, "check_schema", broken)
    monkeypatch.setattr(compiler, "check_schema", broken)
    monkeypatch.setattr(compiler, "prepare", broken)
    good = {"type": "object", "properties": {"n": {"type": "integer", "maximum": 9}}, "required": ["n"]}
    respelled = json.dumps(good, indent=2)  # the same schema as text: another key here, one canonical form
    bad = {"type": "object", "properties": {"xs": {"type": "array", "contains": {"const": 1}, "maxContains": 1}}}
    with GrammarService(str(tokenizer_dir), tokenizer=tokenizer, timeout_s=30, cache=C.GrammarCache()) as svc:
        for key, spec in (("good", good), ("respelled", respelled), ("bad", bad)):
            svc.submit(key, {"json_schema": spec})
        results = dict(svc.wait(timeout_s=120))
    assert isinstance(results["bad"], C.UnsupportedSchemaError)
    assert (results["bad"].keyword, results["bad"].path) == ("contains", "/properties/xs")
    assert run_tokens(results["good"].matcher(), encode(tokenizer, '{"n": 7}'))
    assert not run_tokens(results["good"].matcher(), encode(tokenizer, '{"n": 10}'))
    assert results["respelled"].payload() == results["good"].payload()


def test_service_caps_the_worker_memory(tokenizer: Any, tokenizer_dir: Path) -> None:
    """A compile that needs more memory than the worker's cap fails that request with a clear error
    and leaves a working service (the next spec compiles), instead of taking the host's memory.
    outlines-core's index of "[a-z]{0,1500}!" grows the worker by ~400 MB (measured: 288 -> 692 MB
    of private memory); the cap leaves ~150 MB above the worker's start."""
    with GrammarService(str(tokenizer_dir), tokenizer=tokenizer, timeout_s=60, cache=C.GrammarCache(),
                        memory_limit=None, workers=1) as probe:
        probe.submit("start", {"regex": "a+"})
        probe.wait(timeout_s=120)
        start = _private_bytes(probe._workers[0].proc.pid)
    limit = start + (150 << 20)
    with GrammarService(str(tokenizer_dir), tokenizer=tokenizer, timeout_s=60, cache=C.GrammarCache(),
                        memory_limit=limit) as svc:
        svc.submit("big", {"regex": "[a-z]{0,1500}!", "backend": "outlines"})
        svc.submit("after", {"regex": "[0-9]+x"})
        results = dict(svc.wait(timeout_s=120))
        assert svc.worker_memory_limit == limit
    assert isinstance(results["big"], C.GrammarCompileError)
    assert "memory" in str(results["big"])
    assert run_tokens(results["after"].matcher(), encode(tokenizer, "123x"))


def _private_bytes(pid: int) -> int:
    """The process's private data (what RLIMIT_DATA counts), from /proc."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmData:"):
                return int(line.split()[1]) << 10
    raise AssertionError("no VmData line")


def test_worker_memory_limit_is_a_quarter_of_ram_within_bounds() -> None:
    from radixlm.constrained.compile_worker import MAX_WORKER_MEMORY, MIN_WORKER_MEMORY, worker_memory_limit

    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    assert worker_memory_limit() == max(MIN_WORKER_MEMORY, min(MAX_WORKER_MEMORY, ram // 4))


def test_service_rebuilds_grammars_off_the_callers_thread(tokenizer: Any, tokenizer_dir: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """The caller's side of a compile — the grammar rebuilt from its payload, with every matcher family
    the mask threads use (llguidance: a parser build per family, up to ~0.6 s each for real schemas) —
    runs on the service's build thread; `poll` hands over a grammar ready for `matcher(family)`."""
    import threading

    from radixlm.constrained import service as service_module

    threads: list[str] = []
    real = service_module.grammar_from_payload

    def recorded(*args: Any, **kwargs: Any) -> Any:
        threads.append(threading.current_thread().name)
        return real(*args, **kwargs)

    monkeypatch.setattr(service_module, "grammar_from_payload", recorded)
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}
    with GrammarService(str(tokenizer_dir), tokenizer=tokenizer, timeout_s=30, cache=C.GrammarCache(),
                        families=3) as svc:
        svc.submit("k", {"json_schema": schema})
        (key, grammar), = svc.wait(timeout_s=120)
    assert threads and all(name.startswith("grammar-build") for name in threads)
    assert len(grammar._families) == 3  # built before the handover, not inside a decode step
    # ... and each family's template computed its start mask there: a request's first mask (a deep copy
    # of a template) is not the grammar's first on the scheduler's loop (40-130 ms for 4,000 keys)
    assert grammar._warmed == 3
    for family in range(3):
        assert run_tokens(grammar.matcher(family), encode(tokenizer, '{"n": 12}'))


def test_a_slow_compile_does_not_hold_up_the_queue(tokenizer: Any, tokenizer_dir: Path) -> None:
    """Two workers: specs sent after one that compiles until its timeout come back while it is still
    compiling (one worker: they wait for the timeout). Results arrive in the order they finish."""
    order: list[str] = []
    with GrammarService(str(tokenizer_dir), tokenizer=tokenizer, timeout_s=8, cache=C.GrammarCache(),
                        memory_limit=None, workers=2) as svc:
        svc.submit("slow", {"regex": SLOW_REGEX, "backend": "outlines"})
        for n in range(3):
            svc.submit(f"fast{n}", {"regex": f"[0-9]+x{n}"})
        results: dict[str, Any] = {}
        deadline = time.monotonic() + 120
        while svc.pending() and time.monotonic() < deadline:
            for key, value in svc.poll():
                order.append(key)
                results[key] = value
            time.sleep(0.01)
    assert order[-1] == "slow" and isinstance(results["slow"], C.GrammarCompileError)
    assert "timed out after 8 s" in str(results["slow"])
    for n in range(3):
        assert run_tokens(results[f"fast{n}"].matcher(), encode(tokenizer, f"12x{n}"))
