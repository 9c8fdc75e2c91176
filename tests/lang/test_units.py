"""The language without a model: constructors, parameter resolution, choice methods, templates, tracing."""
from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest

import radixlm as sgl
from radixlm.lang.backend.native import option_token_logprobs
from radixlm.lang.chat_template import get_chat_template, get_chat_template_by_model_path
from radixlm.lang.ir import REGEX_BOOL, REGEX_FLOAT, REGEX_INT, REGEX_STR, SglGen, SglSamplingParams, SglSelect
from radixlm.lang.tracer import extract_prefix_by_tracing


def test_public_api_is_importable_without_torch():
    code = ("import sys, radixlm as sgl\n"
            "assert not {'torch', 'urllib.request', 'radixlm.lang.backend.openai'} & set(sys.modules)\n"
            "names = ['function','gen','gen_int','gen_string','select','image','video','system','user','assistant',"
            "'system_begin','system_end','user_begin','user_end','assistant_begin','assistant_end',"
            "'set_default_backend','flush_cache','get_server_info','RuntimeEndpoint','Runtime','EngineBackend',"
            "'OpenAI','global_config','token_length_normalized','greedy_token_selection',"
            "'unconditional_likelihood_normalized']\n"
            "missing = [n for n in names if not hasattr(sgl, n)]\n"
            "assert not missing, missing\n"
            "assert 'torch' not in sys.modules and 'openai' not in sys.modules\n")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_gen_validates_at_build_time():
    with pytest.raises(re.error):
        sgl.gen("x", regex="(unclosed")
    with pytest.raises(ValueError, match="dtype"):
        sgl.gen("x", dtype=list)
    with pytest.raises(ValueError, match="mutually exclusive"):
        sgl.gen("x", regex="a+", json_schema={"type": "string"})
    with pytest.warns(UserWarning, match="dtype wins"):
        node = sgl.gen("x", dtype=int, regex="a+")
    assert node.overrides["dtype"] == "int" and "regex" not in node.overrides
    with pytest.raises(TypeError, match="choices"):
        sgl.select("x", choices="ab")


def test_gen_with_choices_is_a_select():
    node = sgl.gen("c", choices=["a", "b"])
    assert isinstance(node, SglSelect)
    assert node.temperature == 0.0 and node.choices_method is sgl.token_length_normalized
    assert isinstance(sgl.gen_int("n"), SglGen) and sgl.gen_int("n").dtype == "int"
    assert sgl.gen_string("t").dtype == "str"
    assert sgl.gen("b", dtype="bool").dtype == "bool"


def test_json_schema_accepts_dict_string_and_pydantic():
    pydantic = pytest.importorskip("pydantic")

    class Person(pydantic.BaseModel):
        name: str
        age: int

    from_model = json.loads(sgl.gen("p", json_schema=Person).overrides["json_schema"])
    assert from_model["required"] == ["name", "age"]
    assert sgl.gen("p", json_schema={"type": "integer"}).overrides["json_schema"] == '{"type": "integer"}'
    assert sgl.gen("p", json_schema='{"type": "string"}').overrides["json_schema"] == '{"type": "string"}'


def test_sampling_precedence_and_wire_fields():
    defaults = SglSamplingParams(max_new_tokens=64, temperature=0.7, stop="\n")
    node = sgl.gen("x", max_tokens=5, top_k=3)
    params = node.resolve(defaults)
    assert (params.max_new_tokens, params.temperature, params.top_k, params.stop) == (5, 0.7, 3, "\n")
    params.add_stop(("<|im_end|>",))
    wire = params.to_srt_kwargs()
    assert wire["stop"] == ["\n", "<|im_end|>"]
    assert "dtype" not in wire and "ebnf" not in wire and wire["stop_regex"] == []  # sent always, as SGLang
    assert list(wire)[:3] == ["max_new_tokens", "min_new_tokens", "n"]
    assert defaults.stop == "\n"  # resolution never mutates the run-level defaults


def test_dtype_patterns():
    assert re.fullmatch(REGEX_INT, "-42 \n") and not re.fullmatch(REGEX_INT, "4.2")
    assert re.fullmatch(REGEX_FLOAT, "3.14") and re.fullmatch(REGEX_FLOAT, "-2e5")
    assert re.fullmatch(REGEX_STR, '"hello world 42"') and not re.fullmatch(REGEX_STR, "hello")
    assert re.fullmatch(REGEX_BOOL, "True") and not re.fullmatch(REGEX_BOOL, "true")


def _t(*pairs):
    return [[lp, i, text] for i, (lp, text) in enumerate(pairs)]


def test_choice_methods():
    choices = ["a", "b", "c"]
    cond = [_t((-1.0, "x"), (-3.0, "y")), _t((-1.0, "x"), (-1.0, "z"), (-4.0, "w")), _t((-2.5, "q"))]
    norm = [-2.0, -2.0, -2.5]
    d = sgl.token_length_normalized(choices=choices, normalized_prompt_logprobs=norm, input_token_logprobs=cond,
                                    output_token_logprobs=[[]] * 3)
    assert d.decision == "a"  # tie: the first option wins
    d = sgl.greedy_token_selection(choices=choices, normalized_prompt_logprobs=norm, input_token_logprobs=cond,
                                   output_token_logprobs=[[]] * 3)
    assert d.decision == "b"  # a and b tie on the first token, b wins the second
    assert d.meta_info["greedy_logprob_matrix"][0] == [-1.0, -3.0, -2.0]  # padded with its own mean
    uncond = [_t((None, "x"), (-0.5, "y")), _t((None, "x"), (-5.0, "z"), (-5.0, "w")), _t((None, "q"))]
    d = sgl.unconditional_likelihood_normalized(choices=choices, normalized_prompt_logprobs=norm,
                                                input_token_logprobs=cond, output_token_logprobs=[[]] * 3,
                                                unconditional_token_logprobs=uncond)
    assert d.meta_info["normalized_unconditional_prompt_logprobs"] == [-1.75, (-1 + 4 + 1) / 3, -2.5]
    assert d.decision == "b"
    assert sgl.unconditional_likelihood_normalized.requires_unconditional_logprobs


def test_option_tokens_with_and_without_token_healing():
    normal = _t((-1.0, " France"), (-1.0, " is"), (-0.2, " Paris"))
    assert option_token_logprobs(normal, "The capital of France is", " Paris", 2) == normal[2:]
    healed = _t((-1.0, " is"), (-0.3, " Paris"))  # prefix "... is " + "Paris": the space merged into the option
    assert option_token_logprobs(healed, "France is ", "Paris", 2) == healed[1:]
    no_text = [[-1.0, 1, None], [-1.0, 2, None], [-0.5, 3, None]]
    assert option_token_logprobs(no_text, "p", "x", 2) == no_text[2:]


def test_chat_templates():
    smol = get_chat_template_by_model_path("/root/.cache/radixlm/converted/SmolLM2-135M-Instruct.Q4_1-v1")
    assert smol.name == "smollm2" and smol.stop_str == ("<|im_end|>",)
    assert get_chat_template_by_model_path("meta-llama/Meta-Llama-3-8B-Instruct").name == "llama-3-instruct"
    assert get_chat_template_by_model_path("Qwen/Qwen2-7B-Instruct").default_system_prompt == "You are a helpful assistant."
    assert get_chat_template_by_model_path("some/unknown-model").name == "default"
    default = get_chat_template("default")
    msgs = [{"role": "system", "content": "You are helpful."}, {"role": "user", "content": "hi"}]
    assert default.get_prompt(msgs) + "ASSISTANT:" == "SYSTEM:You are helpful.\nUSER:hi\nASSISTANT:"
    llama2 = get_chat_template("llama-2-chat")
    assert llama2.get_prompt(msgs) == "[INST] <<SYS>>\nYou are helpful.\n<</SYS>>\n\nhi [/INST]"


def test_prefix_tracing_renders_roles_and_stops_at_first_variable():
    class FakeBackend:
        def get_chat_template(self):
            return get_chat_template("chatml")

    @sgl.function
    def prog(s, question):
        s += sgl.system("Be brief.")
        s += sgl.user("Q: " + question)
        s += sgl.assistant(sgl.gen("a"))

    prefix = extract_prefix_by_tracing(prog, FakeBackend())
    assert prefix == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nQ: "

    @sgl.function
    def loops(s, items):
        s += "Header text. "
        for item in items:  # needs a real value: tracing stops here, keeping what it saw
            s += item

    assert extract_prefix_by_tracing(loops, FakeBackend()) == "Header text. "
    bound = extract_prefix_by_tracing(prog.bind(question="why?"), FakeBackend())
    assert bound == prefix + "why?<|im_end|>\n<|im_start|>assistant\n"  # bound values are constants


def test_full_trace_records_forks():
    @sgl.function
    def prog(s, topic):
        s += "Topic: " + topic
        forks = s.fork(2)
        for f in forks:
            f += sgl.gen("idea", max_tokens=4)

    tracer = prog.trace()
    kinds = [type(n).__name__ for n in tracer.nodes]
    assert kinds == ["SglConstantText", "SglArgument", "SglFork"]
    assert [type(c.last_node).__name__ for c in tracer.child_states] == ["SglGen", "SglGen"]
    with pytest.raises(TypeError, match="f-string"):
        f"{tracer.arguments['topic']}"


def test_function_signature_and_bind():
    with pytest.raises(TypeError, match="'s'"):
        sgl.function(lambda state: None)

    @sgl.function(num_api_spec_tokens=8)
    def prog(s, a, b):
        s += a + b

    assert prog.num_api_spec_tokens == 8 and prog.arg_names == ["a", "b"]
    with pytest.raises(TypeError, match="unknown arguments"):
        prog.bind(c=1)
    assert prog.bind(a="x").bind_arguments == {"a": "x"}


def test_chat_template_for_server():
    from radixlm.lang.chat_template import get_chat_template_for_server
    from radixlm.runtime.server.builtin_chat_templates import BUILTIN_CHAT_TEMPLATES

    pick = lambda **info: get_chat_template_for_server(info).name  # noqa: E731
    assert pick(served_model_name="HuggingFaceTB/SmolLM2-135M-Instruct", model_path=None) == "smollm2"
    assert pick(served_model_name="my-model", model_path="meta-llama/Llama-3.2-1B-Instruct") == "llama-3-instruct"
    # A folder named like nothing known: the server's own Jinja template decides.
    for server, ours in (("smollm2", "smollm2"), ("qwen2", "qwen"), ("chatml", "chatml"),
                         ("llama-3", "llama-3-instruct"), ("llama-2", "llama-2-chat"), ("mistral", "mistral")):
        assert pick(served_model_name="finetune-7", chat_template=BUILTIN_CHAT_TEMPLATES[server]) == ours
        # Started with --chat-template NAME: that name wins over the model's name.
        assert pick(served_model_name="Qwen2-7B-Instruct", chat_template_name=server) == ours
    assert pick(served_model_name="finetune-7", chat_template="{{ messages }}") == "default"
