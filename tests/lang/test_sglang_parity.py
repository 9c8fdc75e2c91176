"""Issue 17's DSL fixes without a model: fork item assignment, the template's stop strings only inside
roles (the request bodies SGLang's frontend sends), "$$ANY$$" on the OpenAI backend, and API
speculative execution (its cutting and matching, on a scripted backend; the live-server runs are in
tests/compat)."""
from __future__ import annotations

import threading
from typing import Any

import pytest

import radixlm as sgl
from radixlm.lang.backend.base import BaseBackend
from radixlm.lang.chat_template import get_chat_template
from radixlm.lang.interpreter import ProgramError
from radixlm.lang.ir import ANY_JSON, SglSamplingParams
from tests.lang.mock_server import MockServer


class ScriptedBackend(BaseBackend):
    """Answers each generate call with the next scripted reply and records (prompt, params)."""

    def __init__(self, replies: list[str], is_chat_model: bool = False) -> None:
        super().__init__()
        self.replies = list(replies)
        self.is_chat_model = is_chat_model
        self.calls: list[tuple[Any, SglSamplingParams]] = []
        self.lock = threading.Lock()
        if is_chat_model:
            self.chat_template = get_chat_template("chatml")

    def generate(self, s, sampling_params):
        with self.lock:
            self.calls.append((list(s.messages_) if self.is_chat_model else s.text_, sampling_params))
            return self.replies.pop(0), {"id": len(self.calls)}


# ------------------------------------------------------------------------------ 1: forks[i] += ...
def test_fork_items_accept_in_place_append():
    backend = ScriptedBackend([" a", " b"])

    @sgl.function
    def prog(s):
        s += "Tips:"
        forks = s.fork(2)
        for i in range(2):
            forks[i] += f" tip {i}:"
            forks[i] += sgl.gen("tip", max_tokens=4)
        forks.join()

    state = prog.run(backend=backend)
    assert state.error() is None, state.error()
    assert sorted(state["tip"]) == [" a", " b"]
    assert sorted(prompt for prompt, _ in backend.calls) == ["Tips: tip 0:", "Tips: tip 1:"]


def test_fork_items_cannot_be_replaced():
    backend = ScriptedBackend([])

    @sgl.function
    def prog(s):
        forks = s.fork(2)
        forks[0] = forks[1]

    with pytest.raises(TypeError, match="cannot be replaced"):
        prog.run(backend=backend)


# ------------------------------------------------------------------------------ 6: stop lists
@pytest.fixture()
def smol_mock():
    server = MockServer(model_path="org/SmolLM2-135M-Instruct").start()
    yield server
    server.stop()


def test_template_stops_only_inside_roles(smol_mock):
    endpoint = sgl.RuntimeEndpoint(smol_mock.url)

    @sgl.function
    def prog(s):
        s += "Q: hi\nA:" + sgl.gen("plain", max_tokens=4, stop="\n")
        s += "\nN:" + sgl.gen_int("n", max_tokens=4)
        s += sgl.user("hi")
        s += sgl.assistant(sgl.gen("chat", max_tokens=4, stop="\n"))

    state = prog.run(backend=endpoint)
    assert state.error() is None, state.error()
    stops = [b["sampling_params"]["stop"] for b in smol_mock.generate_bodies()]
    # As SGLang's frontend sends them: a single stop stays a string; dtype stops are " " and "\n".
    assert stops == ["\n", [" ", "\n"], ["\n", "<|im_end|>"]]
    assert all(b["sampling_params"]["stop_regex"] == [] for b in smol_mock.generate_bodies())


# ------------------------------------------------------------------------------ 2: "$$ANY$$" on OpenAI
def test_any_json_on_openai_backend_request_kwargs():
    pytest.importorskip("openai")
    backend = sgl.OpenAI("m", base_url="http://127.0.0.1:9/v1", api_key="x", structured_extras=True)
    kw = backend._request_kwargs(SglSamplingParams(json_schema=ANY_JSON))
    assert kw["extra_body"]["json_schema"] == ANY_JSON and "response_format" not in kw
    other = sgl.OpenAI("m", base_url="http://127.0.0.1:9/v1", api_key="x", structured_extras=False)
    assert other._request_kwargs(SglSamplingParams(json_schema=ANY_JSON))["response_format"] == {"type": "json_object"}


# ------------------------------------------------------------------------------ 5: API speculation
CHARACTER_REPLY = " Ada Lovelace\nBirthday: December 10, 1815\nJob: mathematician\nName: Alan"


@sgl.function(num_api_spec_tokens=64)
def character_completion(s):
    s += "Name:" + sgl.gen("name", stop="\n", max_tokens=16) + "\nBirthday:" + sgl.gen("birthday", stop="\n")
    s += "\nJob:" + sgl.gen("job", stop="\n") + "\n"


def test_completion_speculation_cuts_later_gens_from_one_call():
    backend = ScriptedBackend([CHARACTER_REPLY])
    state = character_completion.run(backend=backend, temperature=0)
    assert state.error() is None, state.error()
    assert (state["name"], state["birthday"], state["job"]) == (" Ada Lovelace", " December 10, 1815", " mathematician")
    assert state.text() == "Name: Ada Lovelace\nBirthday: December 10, 1815\nJob: mathematician\n"
    assert len(backend.calls) == 1
    params = backend.calls[0][1]
    assert params.max_new_tokens == 64 and params.stop_list() == []  # max(16, 64) tokens, no stops


def test_completion_speculation_speculates_again_after_a_wrong_guess():
    # The first call guesses a different delimiter than the program's "\nBirthday:": it is dropped.
    backend = ScriptedBackend([" Ada\nBorn: 1815\n", " 1815\nJob: poet\n", " poet\n"])
    state = character_completion.run(backend=backend, temperature=0)
    assert state.error() is None, state.error()
    assert (state["name"], state["birthday"], state["job"]) == (" Ada", " 1815", " poet")
    assert [p for p, _ in backend.calls] == ["Name:", "Name: Ada\nBirthday:"]
    assert len(backend.calls) == 2


def test_completion_speculation_without_a_stop_asks_for_that_gen():
    backend = ScriptedBackend([" no newline at all", " exact"])

    @sgl.function(num_api_spec_tokens=32)
    def prog(s):
        s += "A:" + sgl.gen("a", stop="\n", max_tokens=8)

    state = prog.run(backend=backend)
    assert state["a"] == " exact"
    assert [p.max_new_tokens for _, p in backend.calls] == [32, 8]
    assert backend.calls[1][1].stop_list() == ["\n"]


@sgl.function(num_api_spec_tokens=128)
def character_chat(s):
    s += sgl.user("Construct a character.")
    s += sgl.assistant("Name:" + sgl.gen("name", stop="\n") + "\nBirthday:" + sgl.gen("birthday", stop="\n")
                       + "\nJob:" + sgl.gen("job", stop="\n"))
    s += sgl.user("Thanks.")


def test_chat_speculation_sends_one_request_per_assistant_message():
    backend = ScriptedBackend(["Name: Ada\nBirthday: 1815\nJob: poet"], is_chat_model=True)
    state = character_chat.run(backend=backend, temperature=0)
    assert state.error() is None, state.error()
    assert (state["name"], state["birthday"], state["job"]) == (" Ada", " 1815", " poet")
    assert len(backend.calls) == 1
    messages, params = backend.calls[0]
    assert [m["role"] for m in messages] == ["user"] and params.max_new_tokens == 128 and params.stop_list() == []
    assert state.messages()[1] == {"role": "assistant", "content": "Name: Ada\nBirthday: 1815\nJob: poet"}


def test_chat_speculation_retries_then_fails_naming_the_reply():
    backend = ScriptedBackend(["Sure!", "I cannot.", "No."], is_chat_model=True)
    state = character_chat.run(backend=backend)
    with pytest.raises(ProgramError, match="did not follow"):
        state["name"]
    assert len(backend.calls) == 3
