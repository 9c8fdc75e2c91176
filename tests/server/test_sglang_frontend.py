"""SGLang's own frontend (sglang.lang, RuntimeEndpoint) as a real client of the server.

Needs `pip install --no-deps sglang==0.5.10` plus pybase64 (see pyproject's test extra)."""
from __future__ import annotations

import pytest

from tests.server.conftest import API_KEY

sgl = pytest.importorskip("sglang")


@pytest.fixture(scope="module")
def backend(server):
    be = sgl.RuntimeEndpoint(server.url, api_key=API_KEY)
    sgl.set_default_backend(be)
    return be


def test_gen_select_stream(backend):
    @sgl.function
    def capital(s, country):
        s += "The capital of " + country + " is"
        s += sgl.gen("city", max_tokens=12, stop=[".", "\n"], temperature=0)
        s += ". Is that right? Answer: " + sgl.select("verdict", choices=["yes", "no"])

    state = capital.run(country="France")
    assert "Paris" in state["city"]
    assert "." not in state["city"] and "\n" not in state["city"]
    assert state["verdict"] in ("yes", "no")
    assert state.get_meta_info("city")["finish_reason"]["type"] in ("stop", "length")
    assert state.text().startswith("The capital of France is")

    streamed = capital.run(country="France", stream=True)
    assert "".join(streamed.text_iter("city")) == state["city"]

    @sgl.function
    def count(s):
        s += "1, 2, 3, 4,"
        s += sgl.gen("more", max_tokens=8, temperature=0, ignore_eos=True)

    plain = count.run()["more"]
    pieces = list(count.run(stream=True).text_iter("more"))
    assert "".join(pieces) == plain and len(pieces) >= 2


def test_batch_roles_and_control(backend):
    @sgl.function
    def chat(s, topic):
        s += sgl.user("Write one word about " + topic + ".")
        s += sgl.assistant(sgl.gen("word", max_tokens=6, temperature=0))

    states = chat.run_batch([{"topic": "cats"}, {"topic": "rain"}], temperature=0)
    assert all(isinstance(st["word"], str) and st["word"] for st in states)
    assert sgl.flush_cache() is None
    info = sgl.get_server_info()
    assert "version" in info and "internal_states" in info


def test_chat_template_by_served_name(server):
    """SGLang's frontend picks a template by /get_model_info's model_path (for the default model, the
    folder its GGUF was converted into). It has no SmolLM pattern of its own (so it falls back to its plain 'default'); after
    radixlm.lang.chat_template.register_with_sglang() it renders SmolLM2's chat format."""
    from sglang.lang import chat_template as theirs

    from radixlm.lang.chat_template import register_with_sglang

    assert sgl.RuntimeEndpoint(server.url, api_key=API_KEY).chat_template.name == "default"
    register_with_sglang()
    register_with_sglang()  # idempotent
    be = sgl.RuntimeEndpoint(server.url, api_key=API_KEY)
    assert be.chat_template.name == "smollm2"
    assert theirs.matching_function_registry.count(theirs.matching_function_registry[-1]) == 1

    @sgl.function
    def chat(s):
        s += sgl.user("Say hi.")
        s += sgl.assistant(sgl.gen("reply", max_tokens=4, temperature=0))

    state = chat.run(backend=be)
    assert state.text().startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    assert "<|im_start|>user\nSay hi.<|im_end|>\n<|im_start|>assistant\n" in state.text()
