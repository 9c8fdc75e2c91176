"""Chat messages -> prompt text, with the tokenizer's chat template or the one given by --chat-template
(a file: Jinja text, or a tokenizer_config.json-style JSON holding "chat_template"; or a Jinja string)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from radixlm.runtime.server.errors import ApiError

_ROLES = {"system", "user", "assistant", "developer"}
# Keys a client may not override through chat_template_kwargs: they are ours to set.
_RESERVED_KWARGS = {"conversation", "messages", "tokenize", "add_generation_prompt", "chat_template",
                    "continue_final_message", "return_dict", "return_tensors", "tools", "documents"}


def load_chat_template(value: str | None) -> str | None:
    """The Jinja source named by --chat-template; None keeps the tokenizer's. Raises ValueError."""
    if value is None:
        return None
    path = Path(value).expanduser()
    if len(value) < 4096 and path.is_file():
        text = path.read_text(encoding="utf-8")
        if path.suffix == ".json":
            data = json.loads(text)
            template = data.get("chat_template") if isinstance(data, dict) else None
            if not isinstance(template, str):
                raise ValueError(f"--chat-template: {value} has no string 'chat_template' entry")
            return template
        return text
    if "{%" in value or "{{" in value:
        return value
    raise ValueError(f"--chat-template: {value!r} is neither an existing file nor a Jinja template string")


class ChatTemplate:
    def __init__(self, tokenizer: Any, template: str | None) -> None:
        self.tokenizer = tokenizer
        self.template = template
        if template is not None:
            self._compile_check(template)

    @property
    def available(self) -> bool:
        return self.template is not None or bool(getattr(self.tokenizer, "chat_template", None))

    def _compile_check(self, template: str) -> None:
        try:
            import jinja2

            jinja2.Environment().parse(template)
        except ImportError:
            return
        except Exception as exc:  # noqa: BLE001 - jinja2.TemplateSyntaxError and friends
            raise ValueError(f"--chat-template: the template does not parse: {exc}") from None

    def render(self, messages: list[dict[str, Any]], *, continue_final: bool = False,
               template_kwargs: dict[str, Any] | None = None) -> str:
        if not self.available:
            raise ApiError(400, "messages: this model has no chat template; start the server with --chat-template "
                                "or use /v1/completions", "messages")
        kwargs = dict(template_kwargs or {})
        if continue_final:
            kwargs["continue_final_message"] = True
        try:
            text = self.tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=not continue_final,
                chat_template=self.template, **kwargs,
            )
        except ApiError:
            raise
        except Exception as exc:  # noqa: BLE001 - template errors (e.g. roles must alternate) are client errors
            raise ApiError(400, f"messages: the chat template failed on these messages: {exc}", "messages") from None
        if not isinstance(text, str):
            raise ApiError(500, "the chat template did not render to text")
        return text


def normalize_messages(raw: Any) -> list[dict[str, Any]]:
    """Validate OpenAI chat messages; returns {role, content[, name]} dicts with text content."""
    if not isinstance(raw, list) or not raw:
        raise ApiError.bad_request("messages", "must be a non-empty list of message objects")
    out = []
    for i, msg in enumerate(raw):
        where = f"messages[{i}]"
        if not isinstance(msg, dict):
            raise ApiError.bad_request(where, "must be an object")
        role = msg.get("role")
        if role in ("tool", "function") or msg.get("tool_calls") or msg.get("function_call"):
            raise ApiError.bad_request(f"{where}.role", "tool and function calling are not supported by this server")
        if role not in _ROLES:
            raise ApiError.bad_request(f"{where}.role", f"must be one of {sorted(_ROLES)}, got {role!r}")
        for key in msg:
            if key not in ("role", "content", "name", "refusal", "reasoning_content"):
                raise ApiError.bad_request(f"{where}.{key}", "unknown field")
        content = _text_content(msg.get("content"), role, where)
        entry: dict[str, Any] = {"role": "system" if role == "developer" else role, "content": content}
        name = msg.get("name")
        if name is not None:
            if not isinstance(name, str):
                raise ApiError.bad_request(f"{where}.name", "must be a string")
            entry["name"] = name
        out.append(entry)
    return out


def _text_content(content: Any, role: str, where: str) -> str:
    if isinstance(content, str):
        return content
    if content is None:
        if role == "assistant":
            return ""
        raise ApiError.bad_request(f"{where}.content", "is required")
    if isinstance(content, list):
        parts = []
        for j, part in enumerate(content):
            if not isinstance(part, dict):
                raise ApiError.bad_request(f"{where}.content[{j}]", "must be an object")
            kind = part.get("type")
            if kind != "text":
                raise ApiError.bad_request(f"{where}.content[{j}].type",
                                           f"only 'text' parts are supported (got {kind!r}); this model is text-only")
            text = part.get("text")
            if not isinstance(text, str):
                raise ApiError.bad_request(f"{where}.content[{j}].text", "must be a string")
            parts.append(text)
        return "\n".join(parts)
    raise ApiError.bad_request(f"{where}.content", "must be a string or a list of content parts")


def template_kwargs(raw: Any) -> dict[str, Any]:
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ApiError.bad_request("chat_template_kwargs", "must be an object")
    bad = sorted(set(raw) & _RESERVED_KWARGS)
    if bad:
        raise ApiError.bad_request(f"chat_template_kwargs.{bad[0]}", "is set by the server and cannot be overridden")
    return dict(raw)
