"""Issue 17's server fixes over HTTP: stop_regex on the three generation routes, json_schema
"$$ANY$$", stop_token_ids outside the vocabulary."""
from __future__ import annotations

import json
import logging
import re

import pytest

from radixlm.runtime.sampling_params import InvalidRequestError, SamplingParams
from tests.server.conftest import grammar_available

PROMPT = "List five fruits, separated by commas:"
PUNCT = r"[,.;:!?\n]"  # greedy output of the default model on PROMPT has one within 24 tokens


def _greedy(server, path: str, body: dict) -> dict:
    status, out = server.run(server.post(path, body))
    assert status == 200, out
    return out


def test_stop_regex_native_cuts_at_the_first_match_and_never_leaks(server):
    sp = {"max_new_tokens": 24, "temperature": 0, "ignore_eos": True}
    full = _greedy(server, "/generate", {"text": PROMPT, "sampling_params": sp})["text"]
    m = re.search(PUNCT, full)
    assert m, f"the greedy output has no match to test with: {full!r}"
    out = _greedy(server, "/generate", {"text": PROMPT, "sampling_params": {**sp, "stop_regex": PUNCT}})
    assert out["text"] == full[: m.start()]
    assert out["meta_info"]["finish_reason"] == {"type": "stop", "matched": PUNCT}
    # A list, and no_stop_trim keeps the matched text (as for stop strings).
    kept = _greedy(server, "/generate", {"text": PROMPT, "sampling_params": {**sp, "stop_regex": ["zzz+", PUNCT],
                                                                             "no_stop_trim": True}})
    assert kept["text"].startswith(full[: m.end()]) and re.search(PUNCT, kept["text"])
    # Streaming: no chunk ever carries the match, and the pieces add up to the trimmed text.
    events = server.run(server.stream("/generate", {"text": PROMPT, "stream": True,
                                                    "sampling_params": {**sp, "stop_regex": PUNCT}}))
    texts = [e["text"] for e in events if e != "[DONE]"]
    assert texts[-1] == full[: m.start()] and not any(re.search(PUNCT, t) for t in texts)


def test_stop_regex_openai_routes(server):
    full = _greedy(server, "/v1/completions", {"prompt": PROMPT, "max_tokens": 24, "temperature": 0,
                                               "ignore_eos": True})["choices"][0]["text"]
    m = re.search(PUNCT, full)
    assert m, full
    out = _greedy(server, "/v1/completions", {"prompt": PROMPT, "max_tokens": 24, "temperature": 0,
                                              "ignore_eos": True, "stop_regex": PUNCT})
    assert out["choices"][0]["text"] == full[: m.start()] and out["choices"][0]["finish_reason"] == "stop"
    chat = {"messages": [{"role": "user", "content": PROMPT}], "max_tokens": 24, "temperature": 0, "ignore_eos": True}
    full_chat = _greedy(server, "/v1/chat/completions", chat)["choices"][0]["message"]["content"]
    mc = re.search(r"\w+", full_chat)
    assert mc, full_chat
    cut = _greedy(server, "/v1/chat/completions", {**chat, "stop_regex": [r"\w+"]})["choices"][0]
    assert cut["message"]["content"] == full_chat[: mc.start()] and cut["finish_reason"] == "stop"


def test_stop_regex_is_validated(server):
    for path, body, field in [
        ("/generate", {"text": "x", "sampling_params": {"stop_regex": "(unclosed"}}, "sampling_params.stop_regex"),
        ("/generate", {"text": "x", "sampling_params": {"stop_regex": ["a*"]}}, "sampling_params.stop_regex"),
        ("/v1/completions", {"prompt": "x", "stop_regex": 3}, "stop_regex"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "stop_regex": "(?"}, "stop_regex"),
    ]:
        status, out = server.run(server.post(path, body))
        assert status == 400 and field in json.dumps(out), (path, out)


@pytest.mark.skipif(not grammar_available(), reason="constrained decoding is not wired in")
def test_json_schema_any_json_on_both_apis(server):
    out = _greedy(server, "/generate", {"text": "A JSON object describing Paris: ",
                                        "sampling_params": {"json_schema": "$$ANY$$", "max_new_tokens": 48,
                                                            "temperature": 0}})
    if out["meta_info"]["finish_reason"]["type"] == "stop":
        json.loads(out["text"])
    else:  # cut by max_new_tokens: still a prefix the grammar allowed
        assert out["text"].lstrip()[:1] in '{["-0123456789tfn'
    chat = _greedy(server, "/v1/chat/completions", {"messages": [{"role": "user", "content": "Describe Paris in JSON."}],
                                                    "json_schema": "$$ANY$$", "max_tokens": 48, "temperature": 0})
    content = chat["choices"][0]["message"]["content"]
    if chat["choices"][0]["finish_reason"] == "stop":
        json.loads(content)
    assert content.lstrip()[:1] in '{["-0123456789tfn'


def test_stop_token_ids_outside_the_vocabulary_are_ignored(server):
    # SGLang's JSON kit sends a Llama-3 id (119690) to every model.
    out = _greedy(server, "/generate", {"text": "1, 2, 3,", "sampling_params": {"max_new_tokens": 3, "temperature": 0,
                                                                              "stop_token_ids": [119690, -1]}})
    assert out["meta_info"]["completion_tokens"] <= 3
    chat = _greedy(server, "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2,
                                                    "stop_token_ids": [119690]})
    assert chat["choices"][0]["finish_reason"] in ("stop", "length")


def test_stop_token_ids_outside_the_vocabulary_log_at_debug(caplog):
    with caplog.at_level(logging.DEBUG, logger="radixlm.runtime.sampling_params"):
        p = SamplingParams.from_dict({"stop_token_ids": [5, 119690, -3]}, vocab_size=100)
    assert p.stop_token_ids == (5,)
    assert "ignoring [119690, -3]" in caplog.text
    with pytest.raises(InvalidRequestError, match="stop_token_ids"):
        SamplingParams.from_dict({"stop_token_ids": ["x"]}, vocab_size=100)


def test_any_json_is_the_true_schema():
    from radixlm.constrained.schema import ANY_JSON, parse_schema

    assert parse_schema(ANY_JSON) is True
