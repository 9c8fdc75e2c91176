"""Chat templates for role blocks (`sgl.user(...)` etc.), chosen from the model path like SGLang does.

A template is data: a prefix and suffix per role, stop strings that end an assistant turn, and an
optional system prompt inserted when a program starts with a non-system role.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from enum import Enum, auto
from typing import Callable


class ChatTemplateStyle(Enum):
    PLAIN = auto()
    LLAMA2 = auto()  # the first system message is folded into the first [INST] block


@dataclass
class ChatTemplate:
    name: str
    default_system_prompt: str | None
    role_prefix_and_suffix: dict[str, tuple[str, str]]
    stop_str: tuple[str, ...] = ()
    image_token: str = "<image>"
    audio_token: str = "<audio>"
    style: ChatTemplateStyle = ChatTemplateStyle.PLAIN

    def get_prefix_and_suffix(self, role: str, hist_messages: list[dict]) -> tuple[str, str]:
        if role not in self.role_prefix_and_suffix:
            raise ValueError(f"chat template {self.name!r} has no role {role!r}")
        prefix, suffix = self.role_prefix_and_suffix[role]
        if self.style == ChatTemplateStyle.LLAMA2:
            if role == "system" and not hist_messages:
                user_prefix, _ = self.role_prefix_and_suffix["user"]
                return user_prefix + prefix, suffix
            if role == "user" and len(hist_messages) == 1 and hist_messages[0]["role"] == "system":
                return "", suffix
        return prefix, suffix

    def get_prompt(self, messages: list[dict]) -> str:
        """Render OpenAI-style messages as the same text a program's role blocks would produce."""
        out: list[str] = []
        hist: list[dict] = []
        if self.default_system_prompt and (not messages or messages[0]["role"] != "system"):
            messages = [{"role": "system", "content": self.default_system_prompt}, *messages]
        for msg in messages:
            prefix, suffix = self.get_prefix_and_suffix(msg["role"], hist)
            out.append(prefix + str(msg["content"]) + suffix)
            hist.append(msg)
        return "".join(out)


chat_template_registry: dict[str, ChatTemplate] = {}
matching_function_registry: list[Callable[[str], str | None]] = []


def register_chat_template(template: ChatTemplate) -> None:
    chat_template_registry[template.name] = template


def register_chat_template_matching_function(func: Callable[[str], str | None]) -> Callable[[str], str | None]:
    matching_function_registry.append(func)
    return func


def get_chat_template(name: str) -> ChatTemplate:
    try:
        return chat_template_registry[name]
    except KeyError:
        known = ", ".join(sorted(chat_template_registry))
        raise ValueError(f"unknown chat template {name!r}; known: {known}") from None


def get_chat_template_by_model_path(model_path: str) -> ChatTemplate:
    return get_chat_template(_matched_name(model_path) or "default")


def _matched_name(model_path: str) -> str | None:
    for matcher in matching_function_registry:
        name = matcher(model_path)
        if name is not None:
            return name
    return None


def _chatml(name: str, system_prompt: str | None) -> ChatTemplate:
    return ChatTemplate(
        name=name,
        default_system_prompt=system_prompt,
        role_prefix_and_suffix={
            role: (f"<|im_start|>{role}\n", "<|im_end|>\n") for role in ("system", "user", "assistant")
        },
        stop_str=("<|im_end|>",),
    )


register_chat_template(ChatTemplate(
    name="default",
    default_system_prompt=None,
    role_prefix_and_suffix={"system": ("SYSTEM:", "\n"), "user": ("USER:", "\n"), "assistant": ("ASSISTANT:", "\n")},
))
register_chat_template(_chatml("chatml", None))
register_chat_template(_chatml("qwen", "You are a helpful assistant."))
# SmolLM2-Instruct's own (HF) template is chatml with this system prompt when none is given.
register_chat_template(_chatml("smollm2", "You are a helpful AI assistant named SmolLM, trained by Hugging Face"))
register_chat_template(ChatTemplate(
    name="llama-3-instruct",
    default_system_prompt=None,
    role_prefix_and_suffix={
        role: (f"<|start_header_id|>{role}<|end_header_id|>\n\n", "<|eot_id|>")
        for role in ("system", "user", "assistant")
    },
    stop_str=("<|eot_id|>",),
))
register_chat_template(ChatTemplate(
    name="llama-2-chat",
    default_system_prompt=None,
    role_prefix_and_suffix={
        "system": ("<<SYS>>\n", "\n<</SYS>>\n\n"),
        "user": ("[INST] ", " [/INST]"),
        "assistant": ("", " </s><s>"),
    },
    style=ChatTemplateStyle.LLAMA2,
))
register_chat_template(ChatTemplate(
    name="mistral",
    default_system_prompt=None,
    role_prefix_and_suffix={
        "system": ("[SYSTEM_PROMPT] ", " [/SYSTEM_PROMPT]"),
        "user": ("[INST] ", " [/INST]"),
        "assistant": ("", " </s><s>"),
    },
    stop_str=("</s>",),
))
register_chat_template(ChatTemplate(
    name="vicuna_v1.1",
    default_system_prompt=(
        "A chat between a curious user and an artificial intelligence assistant. "
        "The assistant gives helpful, detailed, and polite answers to the user's questions."
    ),
    role_prefix_and_suffix={"system": ("", " "), "user": ("USER:", " "), "assistant": ("ASSISTANT:", "</s>")},
))
register_chat_template(ChatTemplate(
    name="gemma-it",
    default_system_prompt=None,
    role_prefix_and_suffix={
        "system": ("", ""),
        "user": ("<start_of_turn>user\n", "<end_of_turn>\n"),
        "assistant": ("<start_of_turn>model\n", "<end_of_turn>\n"),
    },
    stop_str=("<end_of_turn>",),
))

# Ordered: the first pattern that matches the (lower-cased) model path wins.
_PATH_PATTERNS: list[tuple[str, str]] = [
    (r"smollm.*instruct", "smollm2"),
    (r"llama-?3.*instruct", "llama-3-instruct"),
    (r"qwen.*(chat|instruct)", "qwen"),
    (r"llama-?2.*chat", "llama-2-chat"),
    (r"(mistral|mixtral).*instruct", "mistral"),
    (r"tinyllama", "chatml"),
    (r"vicuna|llava-v1\.5", "vicuna_v1.1"),
    (r"gemma.*-it", "gemma-it"),
]


@register_chat_template_matching_function
def _match_by_path(model_path: str) -> str | None:
    path = model_path.lower()
    for pattern, name in _PATH_PATTERNS:
        if re.search(pattern, path):
            return name
    return None


# The server's built-in --chat-template names (runtime/server/builtin_chat_templates.py) -> ours.
_SERVER_TEMPLATE_NAMES = {"chatml": "chatml", "qwen2": "qwen", "smollm2": "smollm2", "llama-3": "llama-3-instruct",
                          "llama-2": "llama-2-chat", "mistral": "mistral"}


def match_by_jinja(source: str) -> str | None:
    """Our template for a server's Jinja chat template, recognised by its markers (None if unsure)."""
    if "<|im_start|>" in source:
        if "named SmolLM" in source:
            return "smollm2"
        return "qwen" if "You are a helpful assistant." in source else "chatml"
    if "<|start_header_id|>" in source:
        return "llama-3-instruct"
    if "<start_of_turn>" in source:
        return "gemma-it"
    if "[INST]" in source:
        return "llama-2-chat" if "<<SYS>>" in source else "mistral"
    return None


def get_chat_template_for_server(model_info: dict) -> ChatTemplate:
    """The template for a server from its /get_model_info: the built-in it was started with, else by its
    served name or model path, else by the markers of the Jinja template it renders chats with."""
    server_name = model_info.get("chat_template_name")
    if isinstance(server_name, str) and server_name in _SERVER_TEMPLATE_NAMES:
        return get_chat_template(_SERVER_TEMPLATE_NAMES[server_name])
    for key in ("served_model_name", "model_path"):
        name = model_info.get(key)
        found = _matched_name(name) if isinstance(name, str) else None
        if found is not None:
            return get_chat_template(found)
    source = model_info.get("chat_template")
    found = match_by_jinja(source) if isinstance(source, str) else None
    return get_chat_template(found or "default")


def register_with_sglang() -> None:
    """Teach SGLang's frontend (sglang.lang, if installed) our templates and name patterns, so its
    RuntimeEndpoint picks the right template for models it has no pattern for (SmolLM2, the default).
    SGLang's frontend chooses by /get_model_info's model_path alone; call this once before creating it."""
    from sglang.lang import chat_template as theirs

    for name in ("smollm2",):
        ours = chat_template_registry[name]
        theirs.register_chat_template(theirs.ChatTemplate(
            name=ours.name, default_system_prompt=ours.default_system_prompt,
            role_prefix_and_suffix=dict(ours.role_prefix_and_suffix), stop_str=ours.stop_str))
    if _match_smollm_for_sglang not in theirs.matching_function_registry:
        theirs.register_chat_template_matching_function(_match_smollm_for_sglang)


def _match_smollm_for_sglang(model_path: str) -> str | None:
    return "smollm2" if re.search(r"smollm.*instruct", model_path.lower()) else None
