"""The byte language llguidance enforces for a JSON schema, as a regular expression, where it is regular.

Covers the schemas whose instances form a regular language and whose lexical rules we mirror
exactly (tests/constrained/test_state_table.py walks both side by side): objects with fixed
property sets (all required, no additional properties; `anyOf` over such objects, which is how
constrained/schema_any_order.py hands property orders on), strings with length bounds, integers
without bounds, booleans, null, arrays with item-count bounds, local `$ref`s without recursion.
Anything else returns None and the grammar keeps llguidance's own masks.

Lexical rules, as llguidance 1.9 applies them with our json_options (measured, see the tests):
whitespace `[ \\t\\n\\r]{0,N}` between tokens, none before the document or after it; string
characters any Unicode scalar but `"`, `\\`, U+0000-U+001F and U+007F; escapes `\\" \\\\ \\b \\f
\\n \\r \\t` and `\\uXXXX` (a surrogate only as a high-low pair, which counts as one character);
keys exactly as json.dumps writes them; integers `-?(0|[1-9][0-9]*)`.
"""

from __future__ import annotations

import json
import re
from typing import Any

from .byte_automaton import Expr, alt, byte_set, literal, opt, rep, seq, utf8_char

_WS_PATTERN = re.compile(r"\[\\x20\\x0A\\x0D\\x09\]\{0,(\d+)\}")
# x-guidance options under which the rules above hold (our llguidance_backend.json_options).
_OPTIONS = {"whitespace_flexible": True, "coerce_one_of": False, "json_allow_general_unicode_escapes": True,
            "lenient": False}
_ANNOTATIONS = frozenset({"title", "description", "$comment", "examples", "default", "$defs", "definitions"})
_MAX_ITEMS = 64  # bounded repetitions are unrolled in the NFA: keep them small


class NotRegular(Exception):
    """The schema is outside what this module mirrors (not necessarily non-regular)."""


def _hex(chars: str) -> Expr:
    return byte_set([ord(c) for c in chars])


_HEX = _hex("0123456789abcdefABCDEF")
_DIGIT = byte_set(range(0x30, 0x3A))


def _string_char() -> Expr:
    """One JSON string character as llguidance counts it for minLength / maxLength."""
    plain = utf8_char([0x22, 0x5C, *range(0x20), 0x7F])
    simple_escape = seq(literal(b"\\"), _hex('"\\bfnrt'))
    non_surrogate = alt(seq(_hex("0123456789abcefABCEF"), _HEX, _HEX, _HEX), seq(_hex("dD"), _hex("01234567"), _HEX, _HEX))
    pair = seq(_hex("dD"), _hex("89abAB"), _HEX, _HEX, literal(b"\\u"), _hex("dD"), _hex("cdefCDEF"), _HEX, _HEX)
    return alt(plain, simple_escape, seq(literal(b"\\u"), alt(non_surrogate, pair)))


_CHAR = _string_char()
_INTEGER = seq(opt(literal(b"-")), alt(literal(b"0"), seq(byte_set(range(0x31, 0x3A)), rep(_DIGIT, 0, None))))


class _Builder:
    def __init__(self, root: dict[str, Any], ws_max: int) -> None:
        self.root = root
        self.ws = rep(byte_set([0x20, 0x0A, 0x0D, 0x09]), 0, ws_max)
        self._resolving: set[str] = set()

    def token_gap(self, *parts: Expr) -> Expr:
        """parts separated by optional whitespace."""
        out: list[Expr] = []
        for i, p in enumerate(parts):
            if i:
                out.append(self.ws)
            out.append(p)
        return seq(*out)

    def schema(self, s: Any) -> Expr:
        if not isinstance(s, dict):
            raise NotRegular("boolean or non-object schema")
        keys = set(s) - _ANNOTATIONS
        if "$ref" in keys:
            if keys != {"$ref"}:
                raise NotRegular("$ref with siblings")
            return self.ref(s["$ref"])
        if "anyOf" in keys:
            if keys != {"anyOf"} or not isinstance(s["anyOf"], list) or not s["anyOf"]:
                raise NotRegular("anyOf with siblings")
            return alt(*(self.schema(x) for x in s["anyOf"]))
        kind = s.get("type")
        if not isinstance(kind, str):
            raise NotRegular("type missing or a list")
        allowed, build = {
            "object": ({"type", "properties", "required", "additionalProperties"}, self.object),
            "array": ({"type", "items", "minItems", "maxItems"}, self.array),
            "string": ({"type", "minLength", "maxLength"}, self.string),
            "integer": ({"type"}, lambda _: _INTEGER),
            "boolean": ({"type"}, lambda _: alt(literal(b"true"), literal(b"false"))),
            "null": ({"type"}, lambda _: literal(b"null")),
        }.get(kind, (set(), None))
        if build is None or not keys <= allowed:
            raise NotRegular(f"type {kind} with {sorted(keys - allowed)}")
        return build(s)

    def ref(self, ref: Any) -> Expr:
        if not isinstance(ref, str) or not ref.startswith("#/"):
            raise NotRegular("non-local $ref")
        if ref in self._resolving:
            raise NotRegular("recursive $ref")
        node: Any = self.root
        for part in ref[2:].split("/"):
            part = part.replace("~1", "/").replace("~0", "~")
            if not isinstance(node, dict) or part not in node:
                raise NotRegular(f"unresolved $ref {ref}")
            node = node[part]
        self._resolving.add(ref)
        try:
            return self.schema(node)
        finally:
            self._resolving.discard(ref)

    def object(self, s: dict[str, Any]) -> Expr:
        props = s.get("properties", {})
        if not isinstance(props, dict) or s.get("additionalProperties") is not False:
            raise NotRegular("object with additional properties")
        if sorted(s.get("required", [])) != sorted(props):
            raise NotRegular("object with optional properties")
        members = []
        for key, sub in props.items():
            text = json.dumps(key)
            if "\\" in text or not text.isascii():
                raise NotRegular("escaped key")
            members.append(self.token_gap(literal(text.encode()), literal(b":"), self.schema(sub)))
        if not members:
            return self.token_gap(literal(b"{"), literal(b"}"))
        body = [members[0]]
        for m in members[1:]:
            body += [literal(b","), m]
        return self.token_gap(literal(b"{"), *body, literal(b"}"))

    def array(self, s: dict[str, Any]) -> Expr:
        lo, hi = _bounds(s, "minItems", "maxItems")
        if "items" not in s or (hi is not None and hi > _MAX_ITEMS) or lo > _MAX_ITEMS:
            raise NotRegular("array without items or with large bounds")
        item = self.schema(s["items"])
        more = rep(seq(self.ws, literal(b","), self.ws, item), max(lo - 1, 0), None if hi is None else hi - 1)
        items = seq(item, more, self.ws)
        return seq(literal(b"["), self.ws, items if lo else opt(items), literal(b"]"))

    def string(self, s: dict[str, Any]) -> Expr:
        lo, hi = _bounds(s, "minLength", "maxLength")
        return seq(literal(b'"'), rep(_CHAR, lo, hi), literal(b'"'))


def _bounds(s: dict[str, Any], low: str, high: str) -> tuple[int, int | None]:
    lo, hi = s.get(low, 0), s.get(high)
    if type(lo) is not int or lo < 0 or (hi is not None and (type(hi) is not int or hi < lo)):
        raise NotRegular(f"bad {low}/{high}")
    return lo, hi


def schema_expression(ll_grammar: str) -> Expr | None:
    """The byte language of an llguidance JSON-schema grammar (LLGuidanceGrammar.ll_grammar),
    or None where this module does not mirror it."""
    try:
        spec = json.loads(ll_grammar)
        grammars = spec["grammars"]
        if len(grammars) != 1 or "json_schema" not in grammars[0] or spec.get("max_tokens") is not None:
            return None
        schema = dict(grammars[0]["json_schema"])
        options = schema.pop("x-guidance", {})
        if any(options.get(k) != v for k, v in _OPTIONS.items()):
            return None
        if options.get("item_separator", ",") != "," or options.get("key_separator", ":") != ":":
            return None
        if options.get("json_allowed_escapes") is not None:
            return None
        found = _WS_PATTERN.fullmatch(options.get("whitespace_pattern") or "")
        if found is None:
            return None
        return _Builder(schema, int(found.group(1))).schema(schema)
    except (NotRegular, KeyError, TypeError, ValueError, RecursionError):
        return None
