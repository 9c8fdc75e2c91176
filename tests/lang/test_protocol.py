"""RuntimeEndpoint's wire behaviour against a logging fake server: the request sequences of §2.6."""
from __future__ import annotations

import socket

import pytest

import radixlm as sgl
from radixlm.lang.backend.base import BackendError, BackendUnreachableError
from radixlm.lang.interpreter import ProgramError
from tests.lang.mock_server import MockServer

BASE_SAMPLING = {
    "skip_special_tokens": True, "spaces_between_special_tokens": True, "max_new_tokens": 16, "min_new_tokens": 0,
    "n": 1, "stop": "\n", "stop_token_ids": [], "stop_regex": [], "temperature": 0, "top_p": 1.0, "top_k": -1, "min_p": 0.0,
    "frequency_penalty": 0.0, "presence_penalty": 0.0, "ignore_eos": False, "regex": None, "json_schema": None,
}


@pytest.fixture()
def mock():
    server = MockServer(model_path="mock/plain-model").start()  # unknown path: the default template
    yield server
    server.stop()


@pytest.fixture()
def endpoint(mock):
    return sgl.RuntimeEndpoint(mock.url, api_key="secret")


def test_construction_gets_model_info_and_sends_the_key(mock, endpoint):
    assert [(r.method, r.path) for r in mock.requests] == [("GET", "/get_model_info")]
    assert mock.requests[0].headers["Authorization"] == "Bearer secret"
    assert endpoint.get_model_name() == "mock/plain-model"
    assert endpoint.get_chat_template().name == "default"


def test_gen_body_matches_sglang(mock, endpoint):
    @sgl.function
    def prog(s):
        s += "Q: hi\nA:" + sgl.gen("a", max_tokens=16, stop="\n", temperature=0)

    state = prog.run(backend=endpoint)
    assert state["a"] == " mock answer"
    assert mock.generate_bodies() == [{"text": "Q: hi\nA:", "sampling_params": BASE_SAMPLING}]
    assert mock.requests[-1].headers["Content-Type"] == "application/json; charset=utf-8"


def test_run_level_defaults_logprob_fields_and_precedence(mock, endpoint):
    @sgl.function
    def prog(s):
        s += "x" + sgl.gen("a", max_tokens=3, return_logprob=True, top_logprobs_num=2)

    prog.run(backend=endpoint, temperature=0.5, top_p=0.9, stop=["END"], max_new_tokens=99)
    body = mock.generate_bodies()[0]
    sp = body["sampling_params"]
    assert (sp["max_new_tokens"], sp["temperature"], sp["top_p"], sp["stop"]) == (3, 0.5, 0.9, ["END"])
    assert body["return_logprob"] is True and body["top_logprobs_num"] == 2
    assert "logprob_start_len" not in body and "return_text_in_logprobs" not in body


def test_dtype_int_becomes_regex_and_blank_stops(mock, endpoint):
    @sgl.function
    def prog(s):
        s += "n=" + sgl.gen("n", dtype=int, max_tokens=16, temperature=0)

    prog.run(backend=endpoint)
    sp = mock.generate_bodies()[0]["sampling_params"]
    assert sp["regex"] == "[-+]?[0-9]+[ \\n]*"
    assert sp["stop"] == [" ", "\n"]


def test_chat_template_stop_strings_are_added(mock):
    mock.model_path = "org/SmolLM2-135M-Instruct"
    endpoint = sgl.RuntimeEndpoint(mock.url)
    assert endpoint.get_chat_template().name == "smollm2"

    @sgl.function
    def prog(s):
        s += sgl.user("hi")
        s += sgl.assistant(sgl.gen("a", max_tokens=4, stop="\n"))

    state = prog.run(backend=endpoint)
    body = mock.generate_bodies()[0]
    assert body["sampling_params"]["stop"] == ["\n", "<|im_end|>"]
    assert body["text"].startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    assert body["text"].endswith("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")
    assert [m["role"] for m in state.messages()] == ["system", "user", "assistant"]


def test_stream_parses_cumulative_sse(mock, endpoint):
    @sgl.function
    def prog(s):
        s += "Q:" + sgl.gen("a", max_tokens=16, stop="\n", temperature=0)

    state = prog.run(backend=endpoint, stream=True)
    pieces = list(state.text_iter("a"))
    assert "".join(pieces) == " mock answer" == state["a"]
    assert "".join(state.text_iter()) == "Q: mock answer"
    assert mock.generate_bodies()[0] == {"text": "Q:", "sampling_params": BASE_SAMPLING, "stream": True}


def test_select_request_sequence(mock, endpoint):
    @sgl.function
    def prog(s):
        s += "It is a very"
        s += sgl.select("v", choices=[" bad day", " good day"])

    state = prog.run(backend=endpoint)
    prefill, scored = mock.generate_bodies()
    assert prefill == {"text": "It is a very", "sampling_params": {"max_new_tokens": 0}}
    assert scored == {
        "text": ["It is a very bad day", "It is a very good day"],
        "sampling_params": {"max_new_tokens": 0, "temperature": 0},
        "return_logprob": True, "return_text_in_logprobs": True, "logprob_start_len": 2,
    }
    assert state["v"] == " good day"
    meta = state.get_meta_info("v")
    # Only the option's own tokens are scored: " a" and " very" belong to the prefix.
    assert [[t[2] for t in opt] for opt in meta["input_token_logprobs"]] == [[" bad", " day"], [" good", " day"]]
    assert meta["normalized_prompt_logprobs"] == [-3.0, -1.75]


def test_unconditional_select_scores_option_tokens_alone(mock, endpoint):
    @sgl.function
    def prog(s):
        s += "Pick:" + sgl.select("v", choices=[" bad", " good"], choices_method=sgl.unconditional_likelihood_normalized)

    prog.run(backend=endpoint)
    bodies = mock.generate_bodies()
    assert len(bodies) == 3
    assert bodies[2] == {"input_ids": [[1001], [1001]], "sampling_params": {"max_new_tokens": 0},
                         "return_logprob": True, "logprob_start_len": 0}


def test_fork_commits_prefix_once_then_branches(mock, endpoint):
    @sgl.function
    def prog(s):
        s += "Shared prefix."
        forks = s.fork(3)
        forks += lambda i: f" branch {i}:" + sgl.gen("x", max_tokens=2)
        forks.join()

    state = prog.run(backend=endpoint)
    bodies = mock.generate_bodies()
    assert bodies[0] == {"text": "Shared prefix.", "sampling_params": {"max_new_tokens": 0}}
    assert sorted(b["text"] for b in bodies[1:]) == [f"Shared prefix. branch {i}:" for i in range(3)]
    assert state["x"] == [" mock answer"] * 3
    assert state.text() == "Shared prefix."


def test_run_batch_precaches_long_constant_prefix(mock, endpoint):
    exemplars = "Q: what is one plus one?\nA: two\n\nQ: what is two plus two?\nA: four\n\n"

    @sgl.function
    def prog(s, q):
        s += exemplars + "Q: " + q + "\nA:" + sgl.gen("a", max_tokens=2)

    states = prog.run_batch([{"q": "a"}, ("b",)], backend=endpoint, num_threads=2)
    bodies = mock.generate_bodies()
    assert bodies[0] == {"text": exemplars + "Q: ", "sampling_params": {"max_new_tokens": 0}}
    assert sorted(b["text"] for b in bodies[1:]) == [exemplars + "Q: a\nA:", exemplars + "Q: b\nA:"]
    assert [st["a"] for st in states] == [" mock answer"] * 2


def test_short_prefix_is_not_precached(mock, endpoint):
    @sgl.function
    def prog(s, q):
        s += "Q: " + q + sgl.gen("a", max_tokens=2)

    prog.run_batch([{"q": "a"}, {"q": "b"}], backend=endpoint)
    assert all(b["sampling_params"].get("max_new_tokens") != 0 for b in mock.generate_bodies())


def test_flush_cache_and_server_info(mock, endpoint):
    sgl.set_default_backend(endpoint)
    try:
        assert sgl.flush_cache() is None
        assert sgl.get_server_info() == {"version": "mock", "cache_hit_rate": 0.5}
    finally:
        sgl.set_default_backend(None)
    paths = [(r.method, r.path, r.body) for r in mock.requests[1:]]
    assert paths == [("POST", "/flush_cache", None), ("GET", "/server_info", None)]


def test_server_error_surfaces_with_its_message(mock, endpoint):
    mock.fail_generate = (400, "sampling_params.top_p: must be in (0, 1]")

    @sgl.function
    def prog(s):
        s += "x" + sgl.gen("a", max_tokens=2)

    state = prog.run(backend=endpoint)
    assert isinstance(state.error(), BackendError)
    with pytest.raises(ProgramError, match=r"top_p: must be in \(0, 1\]"):
        state["a"]


def test_unreachable_server_is_a_clear_error():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # bound but not listening: connection refused
        with pytest.raises(BackendUnreachableError, match=f"cannot reach the server at http://127.0.0.1:{port}"):
            sgl.RuntimeEndpoint(f"http://127.0.0.1:{port}")


def test_no_backend_is_a_clear_error():
    @sgl.function
    def prog(s):
        s += "x"

    sgl.set_default_backend(None)
    with pytest.raises(RuntimeError, match="no backend"):
        prog.run()


def test_state_api_var_scope_set_var_and_contains(mock, endpoint):
    @sgl.function
    def prog(s, who):
        with s.var_scope("greeting"):
            s += "Hello, " + who + "!"
        s["manual"] = 42
        s += sgl.user_begin() + "hi" + sgl.user_end()
        s += " " + sgl.gen(max_tokens=2)  # unnamed: text only

    state = prog.run(who="Ada", backend=endpoint)
    assert state["greeting"] == "Hello, Ada!" and state["manual"] == 42
    assert "greeting" in state and "missing" not in state
    assert state.messages() == [{"role": "user", "content": "hi"}]
    assert state.text() == "Hello, Ada!USER:hi\n  mock answer"
    assert state.ret_value is None and state.error() is None


def test_nested_roles_fail_clearly(mock, endpoint):
    @sgl.function
    def prog(s):
        with s.user():
            s += sgl.assistant("nested")
        s += sgl.gen("after", max_tokens=1)

    state = prog.run(backend=endpoint)
    assert isinstance(state.error(), AssertionError) and "Nested roles" in str(state.error())
    with pytest.raises(ProgramError):
        state["after"]


def test_images_are_refused_clearly(mock, endpoint):
    @sgl.function
    def prog(s):
        s += sgl.user(sgl.image("cat.png") + "What is this?")
        s += sgl.assistant(sgl.gen("a", max_tokens=2))

    state = prog.run(backend=endpoint)
    assert isinstance(state.error(), NotImplementedError)
    assert "image and video inputs are not supported" in str(state.error())
    assert mock.generate_bodies() == []
