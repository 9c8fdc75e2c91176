"""Chat messages -> prompt text, with the tokenizer's chat template or the one given by --chat-template
(a file: Jinja text, or a tokenizer_config.json-style JSON holding "chat_template"; a built-in name
such as chatml or llama-3; or a Jinja string)."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from radixlm.runtime.field_checks import ignore_unknown
from radixlm.runtime.server.builtin_chat_templates import BUILTIN_CHAT_TEMPLATES, builtin_chat_template_name, known_names
from radixlm.runtime.server.errors import ApiError
from radixlm.runtime.server.tools import ToolSpec, arguments_value, call_text

_ROLES = {"system", "user", "assistant", "developer", "tool"}
_KEYS = {"role", "content", "name", "refusal", "reasoning_content"}
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
    builtin = builtin_chat_template_name(value)
    if builtin is not None:
        return BUILTIN_CHAT_TEMPLATES[builtin]
    if "{%" in value or "{{" in value:
        return value
    raise ValueError(f"--chat-template: {value!r} is neither an existing file, a built-in template name "
                     f"({', '.join(known_names())}) nor a Jinja template string")


class ChatTemplate:
    def __init__(self, tokenizer: Any, template: str | None) -> None:
        self.tokenizer = tokenizer
        self.template = template
        self._tool_support: ToolSupport | None = None
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
               template_kwargs: dict[str, Any] | None = None, tools: ToolSpec | None = None) -> str:
        if not self.available:
            raise ApiError(400, "messages: this model has no chat template; start the server with --chat-template "
                                "or use /v1/completions", "messages")
        kwargs = dict(template_kwargs or {})
        if continue_final:
            kwargs["continue_final_message"] = True
        shown = tools.template_tools() if tools is not None else None
        if shown or any(m.get("tool_calls") or m["role"] == "tool" for m in messages):
            caps = self.tool_support()
            messages = _tool_messages(messages, caps)
            if shown and caps.tools:
                kwargs["tools"] = shown
            elif shown:
                messages = _with_system(messages, tools.system_prompt())
        try:
            text = self._apply(messages, continue_final, kwargs)
        except ApiError:
            raise
        except Exception as exc:  # noqa: BLE001 - template errors (e.g. roles must alternate) are client errors
            raise ApiError(400, f"messages: the chat template failed on these messages: {exc}", "messages") from None
        if not isinstance(text, str):
            raise ApiError(500, "the chat template did not render to text")
        return text

    def _apply(self, messages: list[dict[str, Any]], continue_final: bool, kwargs: dict[str, Any]) -> Any:
        kwargs = {"add_generation_prompt": not continue_final, **kwargs}  # /tokenize may turn it off
        return self.tokenizer.apply_chat_template(messages, tokenize=False, chat_template=self.template, **kwargs)

    def tool_support(self) -> ToolSupport:
        """What the template renders, found once by rendering probe conversations: the tool list
        (`tools=`), assistant `tool_calls`, role "tool" results. What it does not is done in plain text."""
        if self._tool_support is None:
            probe_tools = [{"type": "function", "function": {"name": _PROBE_TOOL, "description": "probe",
                                                             "parameters": {"type": "object", "properties": {}}}}]
            tools = _PROBE_TOOL in self._probe(_PROBE_USER, tools=probe_tools)
            calls = _PROBE_CALL in self._probe([*_PROBE_USER, _PROBE_ASSISTANT])
            assistant = _PROBE_ASSISTANT if calls else {"role": "assistant", "content": call_text(_PROBE_CALL, {})}
            role = _PROBE_RESULT in self._probe([*_PROBE_USER, assistant, _PROBE_TOOL_MSG])
            self._tool_support = ToolSupport(tools, calls, role)
        return self._tool_support

    def _probe(self, messages: list[dict[str, Any]], **kwargs: Any) -> str:
        try:
            text = self._apply(messages, False, kwargs)
        except Exception:  # noqa: BLE001 - a template that refuses the probe does not support it
            return ""
        return text if isinstance(text, str) else ""


@dataclass(frozen=True)
class ToolSupport:
    tools: bool
    tool_calls: bool
    tool_role: bool


_PROBE_TOOL, _PROBE_CALL, _PROBE_RESULT = "zq_probe_tool_7c1", "zq_probe_call_7c1", "zq_probe_result_7c1"
_PROBE_USER = [{"role": "user", "content": "Hello"}]
_PROBE_ASSISTANT = {"role": "assistant", "content": "", "tool_calls": [
    {"id": "call_probe7c1", "type": "function", "function": {"name": _PROBE_CALL, "arguments": {}}}]}
_PROBE_TOOL_MSG = {"role": "tool", "tool_call_id": "call_probe7c1", "name": _PROBE_CALL, "content": _PROBE_RESULT}


def _tool_messages(messages: list[dict[str, Any]], caps: ToolSupport) -> list[dict[str, Any]]:
    """Tool calls and results in the shape the template renders, or as plain text where it cannot:
    calls as `{"name": ..., "arguments": {...}}` lines of the assistant message, results as a user
    message (consecutive results merged into one)."""
    out: list[dict[str, Any]] = []
    merging = False
    for msg in messages:
        calls = msg.get("tool_calls")
        if calls and caps.tool_calls:
            msg = {**msg, "tool_calls": [{**c, "function": {"name": c["function"]["name"],
                                                            "arguments": arguments_value(c["function"]["arguments"])}}
                                         for c in calls]}
        elif calls:
            text = "\n".join(call_text(c["function"]["name"], arguments_value(c["function"]["arguments"]))
                             for c in calls)
            msg = {k: v for k, v in msg.items() if k != "tool_calls"}
            msg["content"] = f"{msg['content']}\n{text}" if msg["content"] else text
        elif msg["role"] == "tool" and not caps.tool_role:
            text = f"Result of the function {msg['name']} (call {msg['tool_call_id']}):\n{msg['content']}"
            if merging:
                out[-1] = {**out[-1], "content": out[-1]["content"] + "\n\n" + text}
            else:
                out.append({"role": "user", "content": text})
            merging = True
            continue
        merging = False
        out.append(msg)
    return out


def _with_system(messages: list[dict[str, Any]], text: str) -> list[dict[str, Any]]:
    """The tool description as (the end of) the system message."""
    if messages and messages[0]["role"] == "system":
        first = messages[0]
        return [{**first, "content": f"{first['content']}\n\n{text}" if first["content"] else text}, *messages[1:]]
    return [{"role": "system", "content": text}, *messages]


def normalize_messages(raw: Any) -> list[dict[str, Any]]:
    """Validate OpenAI chat messages; returns {role, content[, name]} dicts with text content, plus
    `tool_calls` (OpenAI shape, arguments a string) on assistant messages and `tool_call_id` / `name`
    (the called function) on role "tool" messages."""
    if not isinstance(raw, list) or not raw:
        raise ApiError.bad_request("messages", "must be a non-empty list of message objects")
    out = []
    calls: dict[str, str] = {}  # id of every tool call so far -> function name
    for i, msg in enumerate(raw):
        where = f"messages[{i}]"
        if not isinstance(msg, dict):
            raise ApiError.bad_request(where, "must be an object")
        role = msg.get("role")
        if role == "function" or msg.get("function_call"):
            raise ApiError.bad_request(f"{where}.role" if role == "function" else f"{where}.function_call",
                                       "the legacy function calling API is not supported; use tool_calls and "
                                       "role 'tool' messages")
        if role not in _ROLES:
            raise ApiError.bad_request(f"{where}.role", f"must be one of {sorted(_ROLES)}, got {role!r}")
        allowed = _KEYS | ({"tool_calls"} if role == "assistant" else {"tool_call_id"} if role == "tool" else set())
        ignore_unknown(where, msg, allowed)
        tool_calls = _tool_calls(msg.get("tool_calls"), where) if role == "assistant" else None
        content = _text_content(msg.get("content"), role, where)
        entry: dict[str, Any] = {"role": "system" if role == "developer" else role, "content": content}
        name = msg.get("name")
        if name is not None:
            if not isinstance(name, str):
                raise ApiError.bad_request(f"{where}.name", "must be a string")
            entry["name"] = name
        if tool_calls:
            entry["tool_calls"] = tool_calls
            calls.update((c["id"], c["function"]["name"]) for c in tool_calls)
        if role == "tool":
            call_id = msg.get("tool_call_id")
            if not isinstance(call_id, str) or not call_id:
                raise ApiError.bad_request(f"{where}.tool_call_id", "is required (the id of the call answered)")
            if call_id not in calls:
                raise ApiError.bad_request(f"{where}.tool_call_id", f"{call_id!r} is not the id of a tool call in "
                                                                    "an earlier assistant message")
            entry["tool_call_id"] = call_id
            entry.setdefault("name", calls[call_id])
        out.append(entry)
    return out


def _tool_calls(raw: Any, where: str) -> list[dict[str, Any]] | None:
    if raw is None or raw == []:
        return None
    where = f"{where}.tool_calls"
    if not isinstance(raw, list):
        raise ApiError.bad_request(where, "must be a list of tool calls")
    out = []
    for j, call in enumerate(raw):
        w = f"{where}[{j}]"
        if not isinstance(call, dict):
            raise ApiError.bad_request(w, "must be an object")
        ignore_unknown(w, call, ("id", "type", "function"))
        if not isinstance(call.get("id"), str) or not call["id"]:
            raise ApiError.bad_request(f"{w}.id", "must be a non-empty string")
        if call.get("type", "function") != "function":
            raise ApiError.bad_request(f"{w}.type", f"must be 'function', got {call.get('type')!r}")
        fn = call.get("function")
        if not isinstance(fn, dict):
            raise ApiError.bad_request(f"{w}.function", "must be an object with 'name' and 'arguments'")
        name, args = fn.get("name"), fn.get("arguments", "{}")
        if not isinstance(name, str) or not name:
            raise ApiError.bad_request(f"{w}.function.name", "must be a non-empty string")
        if isinstance(args, dict):
            args = json.dumps(args, ensure_ascii=False)
        if not isinstance(args, str):
            raise ApiError.bad_request(f"{w}.function.arguments", "must be a string (JSON text)")
        out.append({"id": call["id"], "type": "function", "function": {"name": name, "arguments": args}})
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
