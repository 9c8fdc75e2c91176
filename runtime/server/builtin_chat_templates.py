"""Chat templates known by name for `--chat-template NAME` (as in SGLang and llama.cpp), for models
whose tokenizer has no template or a wrong one. Jinja sources in the shape transformers renders
(`messages`, `add_generation_prompt`, `bos_token`, `eos_token`, `raise_exception`); one per prompt
format of the families radixlm runs (Llama 2/3, Mistral, Qwen2/3, SmolLM2 and other ChatML models).
"""
from __future__ import annotations

_CHATML_TURNS = (
    "{%- for message in messages -%}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
)


def _chatml_with_default_system(prompt: str) -> str:
    """ChatML that inserts `prompt` as the system message when the conversation has none."""
    return ("{%- if not messages or messages[0]['role'] != 'system' -%}"
            "{{ '<|im_start|>system\\n" + prompt + "<|im_end|>\\n' }}{%- endif -%}" + _CHATML_TURNS)


_LLAMA3 = (
    "{{- bos_token -}}"
    "{%- for message in messages -%}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim"
    " + '<|eot_id|>' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif -%}"
)

# Llama 2 chat: the system message is folded into the first [INST] block, each exchange is its own
# <s>...</s> sequence.
_LLAMA2 = (
    "{%- if messages and messages[0]['role'] == 'system' -%}"
    "{%- set system = messages[0]['content'] -%}{%- set turns = messages[1:] -%}"
    "{%- else -%}{%- set system = none -%}{%- set turns = messages -%}{%- endif -%}"
    "{%- for message in turns -%}"
    "{%- if message['role'] == 'user' -%}"
    "{%- if loop.first and system is not none -%}"
    "{{ bos_token + '[INST] <<SYS>>\\n' + system + '\\n<</SYS>>\\n\\n' + message['content'] | trim + ' [/INST]' }}"
    "{%- else -%}{{ bos_token + '[INST] ' + message['content'] | trim + ' [/INST]' }}{%- endif -%}"
    "{%- elif message['role'] == 'assistant' -%}{{ ' ' + message['content'] | trim + ' ' + eos_token }}"
    "{%- else -%}{{ raise_exception('llama-2: only system (first), user and assistant messages') }}"
    "{%- endif -%}"
    "{%- endfor -%}"
)

# Mistral Instruct (v0.1-v0.3 prompt format): one <s>, the system text prefixed to the first user turn.
_MISTRAL = (
    "{{- bos_token -}}"
    "{%- if messages and messages[0]['role'] == 'system' -%}"
    "{%- set system = messages[0]['content'] + '\\n\\n' -%}{%- set turns = messages[1:] -%}"
    "{%- else -%}{%- set system = '' -%}{%- set turns = messages -%}{%- endif -%}"
    "{%- for message in turns -%}"
    "{%- if message['role'] == 'user' -%}"
    "{{ '[INST] ' + (system if loop.first else '') + message['content'] + ' [/INST]' }}"
    "{%- elif message['role'] == 'assistant' -%}{{ ' ' + message['content'] + eos_token }}"
    "{%- else -%}{{ raise_exception('mistral: only system (first), user and assistant messages') }}"
    "{%- endif -%}"
    "{%- endfor -%}"
)

BUILTIN_CHAT_TEMPLATES: dict[str, str] = {
    "chatml": _CHATML_TURNS,
    "qwen2": _chatml_with_default_system("You are a helpful assistant."),
    "smollm2": _chatml_with_default_system("You are a helpful AI assistant named SmolLM, trained by Hugging Face"),
    "llama-3": _LLAMA3,
    "llama-2": _LLAMA2,
    "mistral": _MISTRAL,
}
# Other spellings in use (SGLang's frontend names, llama.cpp's).
_ALIASES = {"qwen": "qwen2", "llama3": "llama-3", "llama-3-instruct": "llama-3", "llama2": "llama-2",
            "llama-2-chat": "llama-2", "mistral-v1": "mistral"}


def builtin_chat_template_name(name: str) -> str | None:
    """The canonical built-in name for `name` (an alias or a canonical name), or None."""
    key = name.strip().lower()
    key = _ALIASES.get(key, key)
    return key if key in BUILTIN_CHAT_TEMPLATES else None


def known_names() -> list[str]:
    return sorted(BUILTIN_CHAT_TEMPLATES)
