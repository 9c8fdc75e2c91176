"""The grammar side's per-tokenizer work (the tokenizer's byte view, llguidance's token trie) is done while
the scheduler process starts, on its own thread, never on the loop nor beside it when the first constrained
request comes (runtime/grammar_warmup.py): the trie's build holds the GIL (0.6-1.7 s) and the byte
view is 0.1-0.3 s of Python on the loop, so a first json_schema request stopped every other stream for both."""
from __future__ import annotations

import json
import multiprocessing
import threading

import pytest

from radixlm.constrained import vocab
from radixlm.runtime import grammar_warmup
from radixlm.runtime.io_struct import ControlReq, SchedulerReady, TokenizedGenerateReq
from radixlm.runtime.sampling_params import SamplingParams
from radixlm.runtime.server_args import ServerArgs

SCHEMA = json.dumps({"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"],
                     "additionalProperties": False})


@pytest.fixture(scope="module")
def model_dir(tiny_model_dir):
    return tiny_model_dir("llama")


def _recording(builds):
    """Record, per thread, each build of the tokenizer's byte view and of llguidance's token trie."""
    import llguidance.hf

    byte_view, trie = vocab._build, llguidance.hf.from_tokenizer

    def build_view(*a, **kw):
        builds.put(("byte view", threading.current_thread().name))
        return byte_view(*a, **kw)

    def build_trie(*a, **kw):
        builds.put(("token trie", threading.current_thread().name))
        return trie(*a, **kw)

    vocab._build, llguidance.hf.from_tokenizer = build_view, build_trie


def _child(args, model_dir, recv, send, builds):  # a forked scheduler process, its builds recorded
    from radixlm.runtime.scheduler_process import run_scheduler_process

    _recording(builds)
    run_scheduler_process(args, model_dir, recv, send)


def _drain(queue) -> list[tuple[str, str]]:
    out = []
    while not queue.empty():
        out.append(queue.get())
    return out


def test_scheduler_process_builds_the_grammar_side_before_it_is_ready(model_dir):
    ctx = multiprocessing.get_context("fork")
    builds = ctx.SimpleQueue()
    to_child, child_in = ctx.Pipe(duplex=False)
    child_out, from_child = ctx.Pipe(duplex=False)
    args = ServerArgs(model_path=str(model_dir), device="cpu", max_total_tokens=4096, log_level="error").resolve()
    # not a daemon: the scheduler process starts its grammar compile workers
    proc = ctx.Process(target=_child, args=(args, str(model_dir), to_child, from_child, builds))
    proc.start()
    try:
        assert child_out.poll(120)
        assert isinstance(child_out.recv(), SchedulerReady)
        # built once each at start-up, on the warm-up thread (before: on the first constrained request,
        # the byte view on the loop's MainThread and the trie on the grammar-build thread)
        assert sorted(_drain(builds)) == [("byte view", "grammar-warmup"), ("token trie", "grammar-warmup")]
        child_in.send([
            TokenizedGenerateReq(rid="plain", input_ids=[5, 6, 7], params=SamplingParams(
                temperature=0.0, max_new_tokens=24, ignore_eos=True)),
            TokenizedGenerateReq(rid="json", input_ids=[5, 6, 8], params=SamplingParams(
                temperature=0.0, max_new_tokens=24, json_schema=SCHEMA))])
        finished: dict[str, object] = {}
        while len(finished) < 2:
            assert child_out.poll(120), "scheduler did not finish"
            for out in child_out.recv():
                if out.finished_reason is not None:
                    finished[out.rid] = out.finished_reason.to_json()["type"]
        assert finished == {"plain": "length", "json": finished["json"]} and finished["json"] in ("stop", "length")
        assert _drain(builds) == []  # the first grammar built nothing of the tokenizer's again
        child_in.send(ControlReq("shutdown", 1))
        proc.join(30)
    finally:
        if proc.is_alive():
            proc.kill()


def test_prepare_fills_what_the_grammar_runtime_would_build(model_dir):
    """In-process: after `prepare`, a GrammarRuntime and its first grammar build neither again."""
    from radixlm.runtime.grammar_runtime import GrammarRuntime
    from tests.runtime.helpers import _tokenizer

    tokenizer = _tokenizer(str(model_dir))
    args = ServerArgs(model_path=str(model_dir), device="cpu", max_total_tokens=4096).resolve()
    grammar_warmup.prepare(args, tokenizer)
    calls: list[str] = []
    real = vocab._build
    vocab._build = lambda *a, **kw: calls.append("byte view") or real(*a, **kw)
    try:
        runtime = GrammarRuntime(args, tokenizer, str(model_dir), len(tokenizer))
    finally:
        vocab._build = real
    try:
        assert calls == []
        assert runtime.service.info is vocab.TokenizerInfo.from_tokenizer(tokenizer)
    finally:
        runtime.close()


def test_no_tokenizer_no_warmup(model_dir):
    args = ServerArgs(model_path=str(model_dir), device="cpu", max_total_tokens=4096).resolve()
    assert grammar_warmup.start(args, None) is None
