"""Our own pass over a JSON schema before any backend sees it.

Backends differ in what they enforce and some drop keywords silently (outlines-core ignores
`minimum`, xgrammar ignores `propertyNames`). So every keyword is checked here against the
set the chosen backend is known (and tested, see tests/constrained) to enforce: an unknown or
unenforceable keyword raises UnsupportedSchemaError with its JSON pointer, or is dropped when
lenient. Annotations are dropped too, so backends only ever see vetted keywords.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from .errors import GrammarCompileError, UnsupportedSchemaError

# Keywords that never constrain an instance (JSON Schema annotations + common extensions).
ANNOTATIONS = frozenset({
    "title", "description", "default", "examples", "example", "$comment", "deprecated",
    "readOnly", "writeOnly", "$schema", "$id", "$anchor", "contentMediaType",
    "contentEncoding", "discriminator", "externalDocs", "xml", "$vocabulary",
})
_SUB_ONE = ("additionalProperties", "items", "contains", "not", "if", "then", "else",
            "propertyNames", "unevaluatedProperties", "unevaluatedItems", "additionalItems",
            "contentSchema")
_SUB_LIST = ("anyOf", "oneOf", "allOf", "prefixItems")
_SUB_MAP = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")

_CORE = frozenset({
    "type", "enum", "const", "properties", "required", "additionalProperties", "items",
    "prefixItems", "minItems", "maxItems", "minLength", "maxLength", "pattern", "format",
    "anyOf", "$ref", "$defs", "definitions",
})
_FORMATS_LLG = frozenset({"date-time", "time", "date", "duration", "email", "hostname", "ipv4",
                          "ipv6", "uuid", "uri"})


# Calendar-exact RFC 3339 formats. Backends' own regexes accept 2021-02-30 or any ':60'; we
# substitute these (Feb 29 only in leap years; no leap seconds: rejecting a rare valid time
# keeps every output valid, accepting an invalid one would not).
_Y = "[0-9]{4}"
_LEAP = "(?:[0-9]{2}(?:0[48]|[2468][048]|[13579][26])|(?:0[48]|[2468][048]|[13579][26])00)"
_DATE = (f"(?:{_Y}-(?:(?:0[13578]|1[02])-(?:0[1-9]|[12][0-9]|3[01])|(?:0[469]|11)-(?:0[1-9]|[12][0-9]|30)"
         f"|02-(?:0[1-9]|1[0-9]|2[0-8]))|{_LEAP}-02-29)")
_TIME = "(?:[01][0-9]|2[0-3]):[0-5][0-9]:[0-5][0-9](?:\\.[0-9]+)?(?:[Zz]|[+-](?:[01][0-9]|2[0-3]):[0-5][0-9])"
FORMAT_PATTERNS = {"date": f"^{_DATE}$", "time": f"^{_TIME}$", "date-time": f"^{_DATE}[Tt]{_TIME}$"}


@dataclass(frozen=True)
class Support:
    """What one backend enforces (keywords), and which format values it knows."""

    keywords: frozenset[str]
    formats: frozenset[str]
    recursion: bool  # recursive $ref (needs a context-free backend)
    max_bound: int | None = None  # largest min/max{Length,Items} worth unrolling into a DFA


SUPPORT: dict[str, Support] = {
    "llguidance": Support(
        _CORE | {"oneOf", "allOf", "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum",
                 "multipleOf", "minProperties", "maxProperties", "patternProperties"},
        _FORMATS_LLG, recursion=True),
    "xgrammar": Support(
        _CORE | {"minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "minProperties",
                 "maxProperties", "patternProperties", "allOf", "oneOf"},
        frozenset({"date-time", "time", "date", "duration", "email", "ipv4", "ipv6", "uuid",
                   "uri", "hostname"}), recursion=True),
    "outlines": Support(
        _CORE,
        # no "uri": outlines-core's URI regex needs ~7 min and 17 GB of token tables here
        frozenset({"date-time", "date", "time", "email", "uuid"}), recursion=False,
        max_bound=64),
}


@dataclass
class CheckedSchema:
    schema: dict[str, Any] | bool  # vetted copy: only keywords the backend enforces
    canonical: str                 # cache-key text of the *original* schema
    recursive: bool = False
    dropped: list[str] = field(default_factory=list)  # "path: keyword" dropped under lenient


# SGLang's json_schema value for "any JSON document" (no schema to follow); the `true` schema here.
ANY_JSON = "$$ANY$$"


def parse_schema(spec: str | dict[str, Any] | bool) -> dict[str, Any] | bool:
    """JSON text or dict -> dict, with the JSON error position on bad text."""
    if isinstance(spec, (dict, bool)):
        return spec
    if spec == ANY_JSON:
        return True
    try:
        parsed = json.loads(spec)
    except json.JSONDecodeError as exc:
        raise GrammarCompileError(f"json_schema is not valid JSON: {exc.msg} at line {exc.lineno} "
                                  f"column {exc.colno} (char {exc.pos})") from exc
    if not isinstance(parsed, (dict, bool)):
        raise GrammarCompileError("json_schema must be a JSON object or boolean")
    return parsed


def _esc(token: str) -> str:
    return token.replace("~", "~0").replace("/", "~1")


def check_schema(spec: str | dict[str, Any] | bool, backend: str, lenient: bool = False) -> CheckedSchema:
    """Vet every keyword for `backend`; raises UnsupportedSchemaError unless lenient."""
    root = parse_schema(spec)
    support = SUPPORT[backend]
    canonical = json.dumps(root, separators=(",", ":"), ensure_ascii=False)
    out = CheckedSchema(schema=True, canonical=canonical)

    def unsupported(key: str, path: str, reason: str = "") -> None:
        if not lenient:
            raise UnsupportedSchemaError(key, path, reason)
        out.dropped.append(f"{path or '#'}: {key}")

    def walk(node: Any, path: str) -> Any:
        if isinstance(node, bool):
            return node
        if not isinstance(node, dict):
            raise GrammarCompileError(f"schema at {path or '#'} must be an object or boolean")
        clean: dict[str, Any] = {}
        for key, value in node.items():
            sub = f"{path}/{_esc(key)}"
            if key in ANNOTATIONS or key.startswith("x-"):
                continue
            if key == "uniqueItems" and value is False:
                continue  # no constraint
            if key not in support.keywords:
                unsupported(key, path, "not enforced by the " + backend + " backend")
                continue
            if key in _SUB_ONE:
                if key == "items" and isinstance(value, list):
                    unsupported(key, path, "array-form items (use prefixItems)")
                    continue
                clean[key] = walk(value, sub)
            elif key in _SUB_LIST:
                if not isinstance(value, list) or not value:
                    raise GrammarCompileError(f"{key} at {path or '#'} must be a non-empty list")
                clean[key] = [walk(v, f"{sub}/{i}") for i, v in enumerate(value)]
            elif key in _SUB_MAP:
                if not isinstance(value, dict):
                    raise GrammarCompileError(f"{key} at {path or '#'} must be an object")
                clean[key] = {k: walk(v, f"{sub}/{_esc(k)}") for k, v in value.items()}
            elif key == "format" and value not in support.formats:
                unsupported("format", path, f"format {value!r} is not enforced by {backend}")
            elif key == "format" and value in FORMAT_PATTERNS:
                if "pattern" in node:
                    unsupported("format", path, f"format {value!r} together with pattern")
                else:
                    clean["pattern"] = FORMAT_PATTERNS[value]
            elif key == "$ref" and not (isinstance(value, str) and value.startswith("#")):
                unsupported("$ref", path, f"only local references ('#/...'), got {value!r}")
            elif key in ("minLength", "maxLength", "minItems", "maxItems") and support.max_bound \
                    and isinstance(value, int) and value > support.max_bound:
                unsupported(key, path, f"bound {value} > {support.max_bound} for a regex backend")
            else:
                clean[key] = value
        return clean

    if root is False:
        raise GrammarCompileError("json_schema `false` accepts no document")
    out.schema = walk({} if root is True else root, "")
    out.recursive = _has_recursion(out.schema)
    if out.recursive and not support.recursion:
        unsupported("$ref", "", "recursive references need a context-free backend")
    return out


def resolve_pointer(root: Any, ref: str) -> Any:
    node = root
    for part in ref.lstrip("#").split("/")[1:] if ref not in ("#", "") else []:
        part = part.replace("~1", "/").replace("~0", "~")
        if isinstance(node, list):
            node = node[int(part)]
        elif isinstance(node, dict) and part in node:
            node = node[part]
        else:
            raise GrammarCompileError(f"$ref {ref!r} does not resolve")
    return node


def _has_recursion(root: Any) -> bool:
    """True if some $ref can reach itself (depth-first over references only)."""
    refs_in: dict[str, set[str]] = {}

    def collect(node: Any, acc: set[str]) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                if k == "$ref" and isinstance(v, str):
                    acc.add(v)
                elif k not in ("$defs", "definitions"):
                    collect(v, acc)
        elif isinstance(node, list):
            for v in node:
                collect(v, acc)

    def edges(ref: str) -> set[str]:
        if ref not in refs_in:
            acc: set[str] = set()
            refs_in[ref] = acc
            collect(resolve_pointer(root, ref), acc)
        return refs_in[ref]

    start: set[str] = set()
    collect(root, start)
    state: dict[str, int] = {}

    def cyclic(ref: str) -> bool:
        if state.get(ref) == 1:
            return True
        if state.get(ref) == 2:
            return False
        state[ref] = 1
        if any(cyclic(r) for r in edges(ref)):
            return True
        state[ref] = 2
        return False

    return any(cyclic(r) for r in start)
