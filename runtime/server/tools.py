"""OpenAI tool calling for /v1/chat/completions.

* `parse_tool_spec`: `tools` + `tool_choice` -> a ToolSpec (400s name the field, e.g. `tools[1].function.name`).
* `ToolSpec.schema()`: the JSON schema that constrains the output when a call is required or named:
  a `{"name": ..., "arguments": {...}}` object (anyOf over the tools for "required").
* `ToolSpec.system_prompt()`: the tool description for chat templates that do not render `tools`.
* `parse_calls`: generated text -> calls, when it is a JSON call object (bare, inside
  <tool_call>...</tool_call> blocks or a ```json fence) naming a known tool with object arguments.
* `could_be_call`: whether a streamed prefix may still turn into a call (streaming holds it back until then).
"""
from __future__ import annotations

import copy
import json
import re
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from radixlm.runtime.field_checks import ignore_unknown
from radixlm.runtime.server.errors import ApiError

_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_FUNCTION_KEYS = {"name", "description", "parameters", "strict"}
_CHOICES = ("auto", "none", "required")
# A function declared without parameters takes none: its arguments are `{}`.
_NO_PARAMS = {"type": "object", "properties": {}, "additionalProperties": False}
_OPEN, _CLOSE = "<tool_call>", "</tool_call>"
# OpenAI's own limit. Each tool's parameters are checked against their draft's metaschema (~8 ms of pure Python for
# a 12-property object on the 2-core CPU): 1,000 tools held the event loop 24 s before that work left it (2026-12-05)
MAX_TOOLS = 128


@dataclass(frozen=True)
class ToolSpec:
    tools: tuple[dict[str, Any], ...]  # {"name", "description"?, "parameters"}
    choice: str  # "auto" | "none" | "required" | "named"
    named: str | None = None

    @property
    def names(self) -> list[str]:
        return [t["name"] for t in self.tools]

    @property
    def constrained(self) -> bool:
        """The output is forced to be a call (a JSON schema constraint)."""
        return self.choice in ("required", "named")

    @property
    def parses(self) -> bool:
        """Generated text is looked at for calls ("none": never)."""
        return self.choice != "none"

    def callable_names(self) -> list[str]:
        return [self.named] if self.choice == "named" else self.names

    def template_tools(self) -> list[dict[str, Any]] | None:
        """`tools=` for the chat template (OpenAI shape); None with "none": the model is not shown them."""
        if self.choice == "none":
            return None
        return [{"type": "function", "function": dict(t)} for t in self.tools]

    def schema(self) -> dict[str, Any]:
        defs: dict[str, Any] = {}
        branches = [_call_schema(t, defs) for t in self.tools if t["name"] in self.callable_names()]
        root = branches[0] if len(branches) == 1 else {"anyOf": branches}
        if defs:
            root = {**root, "$defs": defs}
        return root

    def system_prompt(self) -> str:
        lines = ["You can call the following functions. Each is given as a JSON object with its name, what it "
                 "does and a JSON schema of its arguments:"]
        for t in self.tools:
            lines.append(json.dumps({k: t[k] for k in ("name", "description", "parameters") if k in t},
                                    ensure_ascii=False))
        how = ('reply with only a JSON object of the form {"name": <function name>, "arguments": '
               '{<argument name>: <value>, ...}} and nothing else')
        if self.choice == "named":
            lines.append(f"Call the function {self.named}: {how}.")
        elif self.choice == "required":
            lines.append(f"You must call one of these functions: {how}.")
        else:
            lines.append(f"To call a function, {how}. Otherwise answer normally in plain text.")
        lines.append("A function's result is given back to you in a later message.")
        return "\n".join(lines)


def _bad(param: str, message: str) -> ApiError:
    return ApiError.bad_request(param, message)


def parse_tool_spec(body: dict[str, Any], check_schema: Callable[[Any, str], None]) -> ToolSpec | None:
    """Validate `tools` / `tool_choice`; None when no tools are in play. `check_schema(schema, param)`
    raises a 400 for an invalid JSON schema."""
    for legacy in ("functions", "function_call"):
        if body.get(legacy) is not None:
            raise _bad(legacy, "the legacy function calling API is not supported; use tools and tool_choice")
    raw = body.get("tools")
    choice = body.get("tool_choice")
    if raw is None or raw == []:
        if choice is None or choice in ("none", "auto"):
            return None
        raise _bad("tool_choice", "is only allowed when tools are given")
    if not isinstance(raw, list):
        raise _bad("tools", "must be a list of tool objects")
    if len(raw) > MAX_TOOLS:
        raise _bad("tools", f"has {len(raw)} tools; at most {MAX_TOOLS} are accepted (as in OpenAI's API)")
    tools: list[dict[str, Any]] = []
    seen: set[str] = set()
    for i, item in enumerate(raw):
        where = f"tools[{i}]"
        if not isinstance(item, dict):
            raise _bad(where, "must be an object")
        ignore_unknown(where, item, ("type", "function"))
        if item.get("type") != "function":
            raise _bad(f"{where}.type", f"must be 'function', got {item.get('type')!r}")
        fn = item.get("function")
        if not isinstance(fn, dict):
            raise _bad(f"{where}.function", "must be an object with a 'name'")
        ignore_unknown(f"{where}.function", fn, _FUNCTION_KEYS)
        name = fn.get("name")
        if not isinstance(name, str) or not _NAME.match(name):
            raise _bad(f"{where}.function.name", "must be a string of 1 to 64 letters, digits, '_' or '-', "
                                                 f"got {name!r}")
        if name in seen:
            raise _bad(f"{where}.function.name", f"the function name {name!r} is given twice")
        seen.add(name)
        entry: dict[str, Any] = {"name": name}
        desc = fn.get("description")
        if desc is not None:
            if not isinstance(desc, str):
                raise _bad(f"{where}.function.description", "must be a string")
            entry["description"] = desc
        if fn.get("strict") is not None and not isinstance(fn["strict"], bool):
            raise _bad(f"{where}.function.strict", "must be a boolean")
        params = fn.get("parameters")
        if params is None:
            entry["parameters"] = copy.deepcopy(_NO_PARAMS)
        else:
            param = f"{where}.function.parameters"
            if not isinstance(params, dict):
                raise _bad(param, "must be a JSON schema object")
            if params.get("type", "object") != "object":
                raise _bad(param, f"must be a schema of type 'object' (the arguments), got {params['type']!r}")
            check_schema(params, param)
            entry["parameters"] = params
        tools.append(entry)
    return ToolSpec(tuple(tools), *_choice(choice, seen))


def _choice(choice: Any, names: set[str]) -> tuple[str, str | None]:
    if choice is None:
        return "auto", None
    if isinstance(choice, str):
        if choice not in _CHOICES:
            raise _bad("tool_choice", f"must be one of {list(_CHOICES)} or a named function object, got {choice!r}")
        return choice, None
    if not isinstance(choice, dict):
        raise _bad("tool_choice", "must be a string or an object")
    ignore_unknown("tool_choice", choice, ("type", "function"))
    if choice.get("type") != "function":
        raise _bad("tool_choice.type", f"must be 'function', got {choice.get('type')!r}")
    fn = choice.get("function")
    if not isinstance(fn, dict):
        raise _bad("tool_choice.function", "must be an object with a 'name'")
    name = fn.get("name")
    if not isinstance(name, str):
        raise _bad("tool_choice.function.name", "must be a string")
    if name not in names:
        raise _bad("tool_choice.function.name", f"{name!r} is not one of the tools {sorted(names)}")
    return "named", name


# ------------------------------------------------------------------------------------ schema
def _call_schema(tool: dict[str, Any], defs: dict[str, Any]) -> dict[str, Any]:
    """{"name": const, "arguments": parameters}; the parameters' $defs move to the root (`defs`),
    renamed per tool, with their $refs rewritten (they pointed at the parameters' own root)."""
    params = copy.deepcopy(tool["parameters"])
    prefix = f"{tool['name']}__"
    local = {}
    for key in ("$defs", "definitions"):
        local.update(params.pop(key, None) or {})
    if local:
        params = _rewrite_refs(params, prefix)
        for name, sub in local.items():
            defs[prefix + name] = _rewrite_refs(sub, prefix)
    return {"type": "object", "properties": {"name": {"const": tool["name"]}, "arguments": params},
            "required": ["name", "arguments"], "additionalProperties": False}


def _rewrite_refs(node: Any, prefix: str) -> Any:
    if isinstance(node, list):
        return [_rewrite_refs(v, prefix) for v in node]
    if not isinstance(node, dict):
        return node
    out = {}
    for key, value in node.items():
        if key == "$ref" and isinstance(value, str):
            for old in ("#/$defs/", "#/definitions/"):
                if value.startswith(old):
                    value = "#/$defs/" + prefix + value[len(old):]
                    break
            out[key] = value
        else:
            out[key] = _rewrite_refs(value, prefix)
    return out


# ------------------------------------------------------------------------------------ calls
def call_text(name: str, arguments: Any) -> str:
    """A call in the plain-text format the model is told to use (for templates that cannot render calls)."""
    return json.dumps({"name": name, "arguments": arguments}, ensure_ascii=False)


def arguments_value(arguments: str) -> Any:
    """OpenAI's arguments string -> the object chat templates expect (the string itself if it is not one)."""
    try:
        value = json.loads(arguments)
    except (ValueError, RecursionError):  # (text, or nesting past the parser's ~1,000 levels)
        return arguments
    return value if isinstance(value, dict) else arguments


def parse_calls(text: str, spec: ToolSpec) -> list[dict[str, Any]] | None:
    """[{"name", "arguments": dict}] when the whole text is one or more calls to known tools, else None."""
    s = text.strip()
    if s.startswith(_OPEN):
        bodies = _tagged(s)
    elif s.startswith("```"):
        m = re.fullmatch(r"```(?:json)?\s*(.*?)\s*```", s, re.S)
        bodies = [m.group(1)] if m else None
    elif s.startswith("{"):
        bodies = _objects(s)
    else:
        return None
    if not bodies:
        return None
    names = spec.callable_names()
    calls = []
    for body in bodies:
        call = _one_call(body, names)
        if call is None:
            return None
        calls.append(call)
    return calls


def _tagged(s: str) -> list[str] | None:
    """The bodies of <tool_call>...</tool_call> blocks that make up all of `s` (the last may be unclosed)."""
    bodies, pos = [], 0
    while pos < len(s):
        if s[pos].isspace():
            pos += 1
            continue
        if not s.startswith(_OPEN, pos):
            return None
        start = pos + len(_OPEN)
        end = s.find(_CLOSE, start)
        if end < 0:
            bodies.append(s[start:])
            break
        bodies.append(s[start:end])
        pos = end + len(_CLOSE)
    return bodies


def _objects(s: str) -> list[str] | None:
    """The JSON texts of whitespace-separated objects making up all of `s` (parallel calls, one per line)."""
    decoder, bodies, pos = json.JSONDecoder(), [], 0
    while pos < len(s):
        if s[pos].isspace():
            pos += 1
            continue
        try:
            _, end = decoder.raw_decode(s, pos)
        except (ValueError, RecursionError):
            return None
        bodies.append(s[pos:end])
        pos = end
    return bodies


def _one_call(body: str, names: list[str]) -> dict[str, Any] | None:
    try:
        obj = json.loads(body)
    except (ValueError, RecursionError):  # (a model's output nested past the parser's ~1,000 levels: no call)
        return None
    if not isinstance(obj, dict) or obj.get("name") not in names:
        return None
    args = obj.get("arguments", obj.get("parameters"))  # some models say "parameters"
    if not isinstance(args, dict):
        return None
    return {"name": obj["name"], "arguments": args}


def openai_tool_calls(calls: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
             "function": {"name": c["name"], "arguments": json.dumps(c["arguments"], ensure_ascii=False)}}
            for c in calls]


def could_be_call(text: str) -> bool:
    """Whether streamed text so far may still be (the start of) a call that parse_calls accepts."""
    s = text.lstrip()
    if not s or s.startswith("{") or s.startswith(_OPEN) or _OPEN.startswith(s):
        return True
    if "```json".startswith(s):
        return True
    if not s.startswith("```"):
        return False
    rest = s[3:]
    if rest.startswith("json"):
        rest = rest[4:]
    rest = rest.lstrip()
    return not rest or rest.startswith("{")
