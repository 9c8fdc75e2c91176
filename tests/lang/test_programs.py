"""Programs on a real model, on both the in-process Engine and a live local server (greedy, short)."""
from __future__ import annotations

import asyncio
import ipaddress
import json
import math
import re

import pytest

import radixlm as sgl
from radixlm.lang.backend.base import BackendError
from radixlm.lang.interpreter import ProgramError
from tests.lang.conftest import require_constrained_decoding

EXEMPLARS = (
    "Answer each question with one word.\n\n"
    "Q: What is the capital of France?\nA: Paris\n\n"
    "Q: What is the capital of Germany?\nA: Berlin\n\n"
    "Q: What is the capital of Italy?\nA: Rome\n\n"
)


@sgl.function
def few_shot_qa(s, question):
    s += EXEMPLARS
    s += "Q: " + question + "\nA:" + sgl.gen("answer", max_tokens=12, stop="\n", temperature=0)


def test_few_shot_qa_with_stop(backend):
    state = few_shot_qa.run(question="What is the capital of Spain?", backend=backend)
    answer = state["answer"]
    assert answer.strip() and "\n" not in answer
    assert state.text() == EXEMPLARS + "Q: What is the capital of Spain?\nA:" + answer
    meta = state.get_meta_info("answer")
    assert meta["finish_reason"]["type"] in ("stop", "length") and meta["completion_tokens"] <= 12
    # The same request made by hand gives the same greedy text: the program adds nothing hidden.
    raw = backend._post_generate({"text": EXEMPLARS + "Q: What is the capital of Spain?\nA:",
                                  "sampling_params": {"max_new_tokens": 12, "stop": "\n", "temperature": 0}})
    assert raw["text"] == answer


def test_run_level_defaults_apply_to_gens(backend):
    @sgl.function
    def prog(s):
        s += "Count: one, two," + sgl.gen("more")

    state = prog.run(backend=backend, max_new_tokens=5, temperature=0, ignore_eos=True)
    assert state.get_meta_info("more")["completion_tokens"] == 5


def test_multi_turn_chat_uses_the_model_template(backend, tokenizer):
    @sgl.function
    def chat(s):
        s += sgl.system("You are a geography tutor. Answer briefly.")
        s += sgl.user("What is the capital of France?")
        s += sgl.assistant(sgl.gen("a1", max_tokens=8, temperature=0))
        with s.user():
            s += "And of Japan?"
        s += sgl.assistant(sgl.gen("a2", max_tokens=8, temperature=0))

    state = chat.run(backend=backend)
    messages = state.messages()
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "user", "assistant"]
    assert messages[2]["content"] == state["a1"].lstrip() and "<|im_end|>" not in state["a1"]
    # Rendered exactly like the model's own (Hugging Face) chat template.
    assert state.text() == tokenizer.apply_chat_template(messages, tokenize=False)


def test_default_system_prompt_is_inserted(backend, tokenizer):
    @sgl.function
    def chat(s):
        s += sgl.user("Say hi.")
        s += sgl.assistant(sgl.gen("a", max_tokens=4, temperature=0))

    state = chat.run(backend=backend)
    assert state.messages()[0]["role"] == "system"
    assert state.text() == tokenizer.apply_chat_template(state.messages(), tokenize=False)


def _quantized(backend) -> bool:
    """Whether the served model runs with quantized weights (the Engine's info comes from its front)."""
    engine = getattr(backend, "engine", None)
    loaded = (engine.tokenizer_manager.info.quantization if engine is not None
              else backend.get_server_info().get("quantization"))
    return loaded not in (None, "none")


def _own_option_scores(backend, tokenizer, prefix: str, options: list[str]) -> list[float]:
    """Mean logprob of each option's tokens, from a full-prompt logprob request and our own tokenization."""
    prefix_ids = tokenizer.encode(prefix)
    scores = []
    for option in options:
        full_ids = tokenizer.encode(prefix + option)
        shared = 0
        while shared < min(len(prefix_ids), len(full_ids)) and prefix_ids[shared] == full_ids[shared]:
            shared += 1
        out = backend._post_generate({"text": prefix + option, "sampling_params": {"max_new_tokens": 0},
                                      "return_logprob": True, "logprob_start_len": 0})
        entries = out["meta_info"]["input_token_logprobs"]
        assert [e[1] for e in entries] == full_ids
        values = [e[0] for e in entries[shared:]]
        scores.append(sum(values) / len(values))
    return scores


@pytest.mark.parametrize("prefix,options", [
    ("The capital of France is", [" London", " Paris", " Berlin"]),
    ("Q: Is fire hot or cold?\nA: It is ", ["cold", "hot", "lukewarm and damp"]),  # option after a space
])
def test_select_picks_the_argmax_of_option_logprobs(backend, tokenizer, prefix, options):
    @sgl.function
    def prog(s):
        s += prefix + sgl.select("choice", choices=options)

    state = prog.run(backend=backend)
    scores = _own_option_scores(backend, tokenizer, prefix, options)
    assert state["choice"] == options[max(range(len(options)), key=scores.__getitem__)]
    reported = state.get_meta_info("choice")["normalized_prompt_logprobs"]
    # The default CPU path (GGUF weights kept 4-bit, bfloat16 activations; a dense bfloat16 copy from 8
    # rows) computes a prompt differently by batch shape: select's options batched on a cached prefix vs
    # each prompt alone differed by 0.065 nats (Engine) and 0.118 (server) in the fresh-venv runs; with
    # --quantization none they agree to 1e-6. A plumbing error (wrong token, offset, normalisation) is
    # off by whole nats.
    tolerance = 0.25 if _quantized(backend) else 1e-3
    assert all(math.isclose(a, b, abs_tol=tolerance) for a, b in zip(reported, scores)), (reported, scores)
    assert state.text() == prefix + state["choice"]


def test_choice_methods_on_a_model(backend):
    @sgl.function
    def prog(s):
        s += "The sky on a clear day is"
        s += sgl.select("g", choices=[" blue", " green", " a colour"], choices_method=sgl.greedy_token_selection)
        s += ". Grass is" + sgl.gen("u", choices=[" green", " purple"],
                                    choices_method=sgl.unconditional_likelihood_normalized)

    state = prog.run(backend=backend)
    assert state["g"] in (" blue", " green", " a colour") and state["u"] in (" green", " purple")
    assert len(state.get_meta_info("g")["greedy_logprob_matrix"]) == 3
    uncond = state.get_meta_info("u")["unconditional_token_logprobs"]
    assert len(uncond) == 2  # one-token options have no context to score unconditionally: [] or [null]


def test_fork_three_and_join(backend):
    @sgl.function
    def tips(s, topic):
        s += "Here are three short tips about " + topic + ".\n"
        forks = s.fork(3)
        forks += lambda i: f"Tip {i + 1}:" + sgl.gen("tip", max_tokens=8, stop="\n", temperature=0)
        forks.join()
        s += "Summary:" + sgl.gen("summary", max_tokens=6, stop="\n", temperature=0)

    state = tips.run(topic="staying healthy", backend=backend)
    assert isinstance(state["tip"], list) and len(state["tip"]) == 3
    metas = state.get_meta_info("tip")
    # The shared prefix was committed once before branching: every branch starts from the cache.
    prefix_tokens = backend._post_generate({"text": "Here are three short tips about staying healthy.\n",
                                            "sampling_params": {"max_new_tokens": 0}})["meta_info"]["prompt_tokens"]
    assert all(m["cached_tokens"] >= prefix_tokens - 1 for m in metas)
    assert state.text().startswith("Here are three short tips about staying healthy.\nSummary:")


def test_fork_concatenate_and_copy(backend):
    @sgl.function
    def prog(s):
        s += "Numbers:"
        forks = s.fork(2)
        forks += [" one", " two"]
        forks.join(mode="concate_and_append")
        with s.copy() as c:
            c += " three"

    assert prog.run(backend=backend).text() == "Numbers: one two three"


def test_run_batch_of_32_with_progress_bar(backend, capsys):
    questions = [f"What is {i} plus {i}?" for i in range(32)]
    states = few_shot_qa.run_batch([{"question": q} for q in questions], backend=backend, progress_bar=True)
    assert len(states) == 32
    for q, st in zip(questions, states):
        assert st.text().startswith(EXEMPLARS + "Q: " + q + "\nA:")
        assert "\n" not in st["answer"]
    assert "32/32" in capsys.readouterr().err


@sgl.function
def story(s):
    s += "Once upon a time," + sgl.gen("story", max_tokens=8, temperature=0, ignore_eos=True)


def test_streaming_pieces_concatenate_to_the_final_text(backend):
    state = story.run(backend=backend, stream=True)
    pieces = list(state.text_iter("story"))
    assert "".join(pieces) == state["story"] and len(pieces) >= 2
    assert state.get_meta_info("story")["completion_tokens"] == 8

    state = story.run(backend=backend, stream=True)
    assert "".join(state.text_iter()) == state.text() == "Once upon a time," + state["story"]

    async def collect():
        st = few_shot_qa.run(question="What is the capital of Chile?", backend=backend, stream=True)
        return [p async for p in st.text_async_iter("answer")], st

    pieces, st = asyncio.run(collect())
    assert "".join(pieces) == st["answer"]


def test_n_samples_return_a_list(backend):
    @sgl.function
    def prog(s):
        s += "A random animal:" + sgl.gen("animal", n=3, max_tokens=4, temperature=1.0)

    state = prog.run(backend=backend)
    assert isinstance(state["animal"], list) and len(state["animal"]) == 3
    assert state.text() == "A random animal:" + state["animal"][0]


def test_unknown_variable_and_failed_step_are_clear_errors(backend):
    state = few_shot_qa.run(question="What is the capital of Chad?", backend=backend)
    with pytest.raises(KeyError, match="unknown variable 'answr'.*answer"):
        state["answr"]

    @sgl.function
    def bad(s):
        s += "x" + sgl.gen("y", max_tokens=4, top_p=0.0)

    failed = bad.run(backend=backend)
    assert isinstance(failed.error(), (BackendError, ValueError))
    with pytest.raises(ProgramError, match="top_p"):
        failed["y"]


def test_regex_ip_address(backend):
    require_constrained_decoding(backend)
    ip = r"((25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)\.){3}(25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)"

    @sgl.function
    def prog(s):
        s += "The IP address of the local DNS server is " + sgl.gen("ip", regex=ip, max_tokens=20, temperature=0)

    state = prog.run(backend=backend)
    assert state.error() is None, state.error()
    assert re.fullmatch(ip, state["ip"]) and ipaddress.ip_address(state["ip"])


def test_json_schema_from_pydantic_and_dict(backend):
    require_constrained_decoding(backend)
    pydantic = pytest.importorskip("pydantic")
    jsonschema = pytest.importorskip("jsonschema")

    class City(pydantic.BaseModel):
        model_config = pydantic.ConfigDict(extra="forbid")  # additionalProperties: false
        name: str = pydantic.Field(max_length=16)
        is_capital: bool

    schema = {"type": "object", "properties": {"country": {"type": "string", "maxLength": 16},
                                               "is_island": {"type": "boolean"}},
              "required": ["country", "is_island"], "additionalProperties": False}

    @sgl.function
    def prog(s):
        s += "Describe Paris as JSON: " + sgl.gen("city", json_schema=City, max_tokens=64, temperature=0)
        s += "\nDescribe Japan as JSON: " + sgl.gen("country", json_schema=schema, max_tokens=64, temperature=0)

    state = prog.run(backend=backend)
    assert state.error() is None, state.error()
    City.model_validate_json(state["city"]), state["city"]
    jsonschema.validate(json.loads(state["country"]), schema)


def test_int_and_bool_dtypes(backend):
    require_constrained_decoding(backend)

    @sgl.function
    def prog(s):
        s += "Q: How many legs does a spider have?\nA: " + sgl.gen("legs", dtype=int, max_tokens=6, temperature=0)
        s += "\nQ: Is the sun a star? Answer True or False.\nA: " + sgl.gen("star", dtype=bool, max_tokens=4, temperature=0)

    state = prog.run(backend=backend)
    assert state.error() is None, state.error()
    assert re.fullmatch(r"[-+]?\d+", state["legs"])
    assert state["star"] in ("True", "False")


def test_ebnf_grammar(backend):
    require_constrained_decoding(backend)

    @sgl.function
    def prog(s):
        s += "Is water wet? Reply yes or no: " + sgl.gen("yn", ebnf='root ::= "yes" | "no"', max_tokens=4)
        s += "\nA date: " + sgl.gen("date", ebnf='root ::= [0-9]{4} "-" [0-9]{2} "-" [0-9]{2}', max_tokens=12,
                                    temperature=0)

    state = prog.run(backend=backend)
    assert state.error() is None, state.error()
    assert state["yn"] in ("yes", "no")
    assert re.fullmatch(r"\d{4}-\d{2}-\d{2}", state["date"])
