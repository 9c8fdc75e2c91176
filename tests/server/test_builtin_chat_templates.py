"""Built-in --chat-template names: each renders what the model family expects, the same text as the
DSL's template of that name, and SmolLM2's exactly as the model's own tokenizer template."""
from __future__ import annotations

import pytest

from radixlm.lang.chat_template import get_chat_template
from radixlm.runtime.server.builtin_chat_templates import BUILTIN_CHAT_TEMPLATES, builtin_chat_template_name
from radixlm.runtime.server.chat import ChatTemplate, load_chat_template
from radixlm.runtime.server.errors import ApiError

CHAT = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "Name a colour."}]
WITH_SYSTEM = [{"role": "system", "content": "Be brief."}, *CHAT]
# The DSL's template for each built-in (their texts must agree: programs and chats share the KV prefix).
DSL_NAME = {"chatml": "chatml", "qwen2": "qwen", "smollm2": "smollm2", "llama-3": "llama-3-instruct"}


@pytest.fixture(scope="module")
def tokenizer():
    from radixlm.runtime.model_source import resolve_model_path
    from radixlm.runtime.tokenizer_manager import load_tokenizer

    return load_tokenizer(resolve_model_path(None, progress=False))


def _render(tokenizer, name: str, messages: list[dict]) -> str:
    return ChatTemplate(tokenizer, load_chat_template(name)).render(messages)


def test_names_and_aliases():
    assert builtin_chat_template_name("ChatML") == "chatml"
    assert builtin_chat_template_name("llama-3-instruct") == builtin_chat_template_name("llama3") == "llama-3"
    assert builtin_chat_template_name("qwen") == "qwen2" and builtin_chat_template_name("nope") is None
    with pytest.raises(ValueError, match="built-in template name.*chatml"):
        load_chat_template("no-such-template")


@pytest.mark.parametrize("name", sorted(DSL_NAME))
def test_same_text_as_the_dsl(tokenizer, name):
    dsl = get_chat_template(DSL_NAME[name])
    for messages in (CHAT, WITH_SYSTEM):
        expected = dsl.get_prompt(messages) + dsl.get_prefix_and_suffix("assistant", messages)[0]
        text = _render(tokenizer, name, messages)
        if name == "llama-3":
            expected = tokenizer.bos_token + expected
        assert text == expected, name


def test_smollm2_matches_the_model_template(tokenizer):
    for messages in (CHAT, WITH_SYSTEM):
        assert _render(tokenizer, "smollm2", messages) == tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True)


def test_llama2_mistral_and_roles(tokenizer):
    bos, eos = tokenizer.bos_token, tokenizer.eos_token
    # Meta's format: one <s>...</s> sequence per exchange, the system text inside the first [INST].
    assert _render(tokenizer, "llama-2", WITH_SYSTEM) == (
        f"{bos}[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nHi [/INST] Hello! {eos}{bos}[INST] Name a colour. [/INST]")
    assert _render(tokenizer, "mistral", WITH_SYSTEM) == (
        f"{bos}[INST] Be brief.\n\nHi [/INST] Hello!{eos}[INST] Name a colour. [/INST]")
    for name in ("mistral", "llama-2"):  # a message the format has no place for is a client error
        with pytest.raises(ApiError, match="only system"):
            _render(tokenizer, name, [{"role": "user", "content": "a"}, {"role": "system", "content": "late"}])
    assert set(BUILTIN_CHAT_TEMPLATES) == {*DSL_NAME, "llama-2", "mistral"}
