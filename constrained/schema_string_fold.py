"""A string schema built from boolean combinations of patterns and lengths, as one regex.

llguidance intersects and complements the patterns of `allOf` / `anyOf` / `not` itself and gives
up on larger combinations ("Unable to determine if regex is empty": Handwritten---allany13/14,
three anyOfs of anchored patterns and their negations under a length window). When the root
schema admits strings only (`type: "string"`), its language is a boolean combination of regular
languages over the string's characters, so we build the automaton ourselves (interegular, ECMA
patterns read by schema_pattern_complement) and hand the backend `{"type": "string", "pattern":
"^…$"}` for exactly those strings.

Restricted to strings, each keyword is exact: `pattern` (search semantics), `minLength` /
`maxLength` (code points), string `const` / `enum` members, `type` (all strings or none),
`allOf` ∩, `anyOf` ∪, `oneOf` (exactly one), `not` (complement among strings), `if`/`then`/`else`,
`$ref` (resolved as schema_refs resolves it; draft-04..07 siblings of `$ref` ignored). Keywords
of other instance types (numbers, arrays, objects) hold for every string; annotations are not
validation. Anything else (`format`, dynamic references, a recursive `$ref`, automata past the
size limit) raises Unsupported, and the schema's first error stands.
"""

from __future__ import annotations

from typing import Any

import interegular

from .schema_negation import Unsupported
from .schema_pattern_complement import _fsm, _literal, _to_regex
from .schema_refs import RefIndex, get
from .schema_support import VALIDATION

MAX_DEPTH = 32
MAX_STATES = 1000  # per intermediate automaton: product constructions grow fast
# Validation keywords that constrain numbers, arrays or objects only: every string satisfies them.
_NOT_FOR_STRINGS = frozenset({
    "multipleOf", "maximum", "exclusiveMaximum", "minimum", "exclusiveMinimum", "maxItems", "minItems",
    "uniqueItems", "maxContains", "minContains", "maxProperties", "minProperties", "required",
    "dependentRequired", "dependencies", "dependentSchemas", "prefixItems", "items", "additionalItems",
    "contains", "properties", "patternProperties", "additionalProperties", "propertyNames",
    "unevaluatedItems", "unevaluatedProperties", "then", "else",  # then/else: read with `if`
})


def _regex_fsm(regex: str) -> Any:
    return interegular.parse_pattern(regex).to_fsm()


class _Folder:
    def __init__(self, root: Any) -> None:
        self.root, self.index = root, RefIndex(root)
        self.all = _regex_fsm("[\\s\\S]*")
        self.none = self.all.everythingbut()

    def _checked(self, fsm: Any) -> Any:
        fsm = fsm.reduce()
        if len(fsm.states) > MAX_STATES:
            raise Unsupported("pattern", f"string automaton over {MAX_STATES} states")
        return fsm

    def fold(self, node: Any, ptr: tuple[str, ...], depth: int = 0) -> Any:
        """The automaton of the strings `node` (at document pointer `ptr`) accepts."""
        if depth > MAX_DEPTH:
            raise Unsupported("$ref", "string schema nested or recursive past the fold's depth")
        if node is True or node == {}:
            return self.all
        if node is False:
            return self.none
        if not isinstance(node, dict):
            raise Unsupported("schema", "not a schema")
        draft = self.index.draft_at(ptr)
        keys = ["$ref"] if "$ref" in node and draft < 2019 else list(node)
        out = self.all
        for key in keys:
            if key not in VALIDATION or key in _NOT_FOR_STRINGS:
                continue
            out = self._checked(out & self.keyword(key, node[key], node, ptr, depth))
        return out

    def keyword(self, key: str, value: Any, node: dict[str, Any], ptr: tuple[str, ...], depth: int) -> Any:
        sub = ptr + (key,)
        if key == "type":
            names = [value] if isinstance(value, str) else value
            return self.all if isinstance(names, list) and "string" in names else self.none
        if key == "pattern" and isinstance(value, str):
            return _fsm(value)
        if key in ("minLength", "maxLength") and isinstance(value, int) and not isinstance(value, bool):
            return _regex_fsm(f"[\\s\\S]{{{value},}}" if key == "minLength" else f"[\\s\\S]{{0,{value}}}")
        if key in ("const", "enum"):
            words = [value] if key == "const" else value if isinstance(value, list) else []
            out = self.none
            for w in words:
                if isinstance(w, str):
                    out = out | _regex_fsm("".join(_literal(c) for c in w) if w else "")
            return out
        if key in ("allOf", "anyOf", "oneOf") and isinstance(value, list) and value:
            parts = [self.fold(v, sub + (str(i),), depth + 1) for i, v in enumerate(value)]
            return self.combine(key, parts)
        if key == "not":
            return self._checked(self.all & self.fold(value, sub, depth + 1).everythingbut())
        if key == "if":
            cond = self.fold(value, sub, depth + 1)
            then = self.fold(node.get("then", True), ptr + ("then",), depth + 1)
            other = self.fold(node.get("else", True), ptr + ("else",), depth + 1)
            return self._checked((cond & then) | (self.all & cond.everythingbut() & other))
        if key == "$ref" and isinstance(value, str):
            target = self.index.resolve(value, self.index.base_of(ptr))
            if target is None:
                raise Unsupported("$ref", f"{value!r} is not a schema inside this document")
            return self.fold(get(self.root, target), target, depth + 1)
        raise Unsupported(key, "not a string keyword the fold reads")

    def combine(self, key: str, parts: list[Any]) -> Any:
        if key == "allOf":
            out = self.all
            for p in parts:
                out = self._checked(out & p)
            return out
        if key == "anyOf":
            out = self.none
            for p in parts:
                out = self._checked(out | p)
            return out
        once, twice = self.none, self.none  # oneOf: strings in one part and in no other
        for p in parts:
            twice = self._checked(twice | (once & p))
            once = self._checked(once | p)
        return self._checked(once & twice.everythingbut())


def fold_string_schema(schema: Any) -> dict[str, Any] | None:
    """`{"type": "string", "pattern": …}` with the language of `schema` where its root admits
    strings only; None where it does not (or the fold cannot read it exactly)."""
    if not isinstance(schema, dict) or schema.get("type") != "string":
        return None
    try:
        fsm = _Folder(schema).fold(schema, ())
        body = _to_regex(fsm)
    except Unsupported:
        return None
    if body is None:
        return None  # no string at all: left to the backend's own answer
    return {"type": "string", "pattern": f"^{body}$"}
