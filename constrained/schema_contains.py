"""`contains` over unbounded arrays, as an llguidance Lark grammar with JSON-schema leaves.

llguidance's JSON-schema front end cannot say "at least one item matches S"; its Lark front end
can: an array of items I with one item of I ∧ S is
`"[" (i ",")* s_and_i ("," i)* "]"`, each item a `%json {...}` leaf vetted by schema.py as usual.
The array node and its path from the root (allOf merged, `$ref`, `items`, `anyOf`) become Lark
rules; every subschema that reaches no `contains` stays one JSON-schema leaf. Anything else on the
path (other keywords next to `contains`, `maxContains`, `minContains` > 1, properties, `oneOf`...)
is refused, so the route is exact or not taken. It is a retry: compiler.py tries it only for a
schema the ordinary vetting refuses over `contains`.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from .schema_negation import Unsupported
from .schema_refs import draft_of
from .schema_support import VALIDATION

# Keywords a `contains` or `items` node may carry besides those the rules write out.
_ARRAY_KEYS = frozenset({"type", "items", "contains", "minContains", "minItems"})
_LOCAL_REFS = ("#/definitions/", "#/$defs/")
_SCOPED = ("$id", "$anchor", "$dynamicAnchor", "$recursiveAnchor", "$dynamicRef", "$recursiveRef")
_MAX_RULES = 64
_OTHER_TYPES = ("null", "boolean", "object", "number", "string")


def _walk(node: Any, root: bool = True) -> Any:
    """Every dict below node (node included)."""
    if isinstance(node, dict):
        yield node, root
        for value in node.values():
            yield from _walk(value, False)
    elif isinstance(node, list):
        for value in node:
            yield from _walk(value, False)


class ContainsGrammar:
    """Lark text for one document; `leaf(schema_document)` vets a leaf into its JSON schema."""

    def __init__(self, root: dict[str, Any], leaf: Callable[[dict[str, Any]], Any], options: dict[str, Any],
                 whitespace_max: int) -> None:
        self.root, self.leaf, self.options = root, leaf, options
        self.ws = f"/[\\x20\\x0A\\x0D\\x09]{{0,{whitespace_max}}}/"
        self.rules: list[str] = []
        self.draft = draft_of(root)
        self._check_scopes()

    def _check_scopes(self) -> None:
        """Leaves are vetted as documents of their own that carry the root's definitions: only
        references into those, and no inner resource scopes, keep their meaning there."""
        for node, is_root in _walk(self.root):
            ref = node.get("$ref")
            if isinstance(ref, str) and not ref.startswith(_LOCAL_REFS):
                raise Unsupported("contains", f"$ref {ref!r} outside definitions")
            if not is_root and (any(k in node for k in _SCOPED) or isinstance(node.get("id"), str)):
                raise Unsupported("contains", "an inner resource scope")

    def text(self) -> str:
        top = self.rule(self.root, 0)
        return "\n".join([f"start: {top}", f"WS: {self.ws}", *self.rules])

    def _new(self, body: str) -> str:
        if len(self.rules) >= _MAX_RULES:
            raise Unsupported("contains", "too many rules")
        name = f"r{len(self.rules)}"
        self.rules.append(f"{name}: {body}")
        return name

    def resolve(self, node: Any) -> Any:
        """The node with a lone `$ref` followed (sibling validation keywords: refused)."""
        for _ in range(32):
            if not isinstance(node, dict) or "$ref" not in node:
                return node
            if any(k in VALIDATION for k in node if k != "$ref"):
                raise Unsupported("contains", "$ref beside other keywords on the path to contains")
            target: Any = self.root
            for part in node["$ref"][2:].split("/"):
                part = part.replace("~1", "/").replace("~0", "~")
                if not isinstance(target, dict) or part not in target:
                    raise Unsupported("contains", f"unresolved $ref {node['$ref']!r}")
                target = target[part]
            node = target
        raise Unsupported("contains", "$ref chain too long")

    def reaches_contains(self, node: Any, seen: frozenset[str] = frozenset()) -> bool:
        for sub, _ in _walk(node):
            if "contains" in sub:
                return True
            ref = sub.get("$ref")
            if isinstance(ref, str) and ref not in seen and self.reaches_contains(self.resolve({"$ref": ref}),
                                                                                    seen | {ref}):
                return True
        return False

    def merged(self, node: Any) -> Any:
        """allOf members (and their allOf) folded into one node, key by key where that is exact."""
        node = self.resolve(node)
        if not isinstance(node, dict) or "allOf" not in node:
            return node
        out = {k: v for k, v in node.items() if k != "allOf"}
        for member in node["allOf"]:
            member = self.merged(member)
            if member is True or member == {}:
                continue
            if not isinstance(member, dict):
                raise Unsupported("contains", "a false allOf member")
            for key, value in member.items():
                if key not in VALIDATION or key not in out:
                    out[key] = value
                elif key == "items" and isinstance(value, (dict, bool)) and isinstance(out[key], (dict, bool)):
                    out[key] = {"allOf": [out[key], value]}
                elif key == "type" and _types(value) is not None and _types(out[key]) is not None:
                    both = [t for t in _types(out[key]) if t in _types(value)]
                    out[key] = both
                elif out[key] != value:
                    raise Unsupported("contains", f"{key} twice in an allOf on the path to contains")
        return out

    def rule(self, node: Any, depth: int) -> str:
        if depth > 16:
            raise Unsupported("contains", "path to contains too deep")
        if not self.reaches_contains(node):
            return self._json_leaf(node)
        node = self.merged(node)
        keys = {k for k in node if k in VALIDATION}
        if keys == {"anyOf"}:
            return self._new(" | ".join(self.rule(m, depth + 1) for m in node["anyOf"]))
        if not keys <= _ARRAY_KEYS:
            raise Unsupported("contains", f"{sorted(keys - _ARRAY_KEYS)} on the path to contains")
        types = _types(node.get("type", list(_OTHER_TYPES) + ["array"]))
        if types is None or not set(types) <= set(_OTHER_TYPES) | {"array", "integer"}:
            raise Unsupported("contains", "unknown type on the path to contains")
        others = [t for t in types if t != "array"]  # array keywords leave other types alone
        if "array" not in types:
            return self._json_leaf({"type": others})
        array = self._array(node, depth)
        return self._new(f"{array} | {self._json_leaf({'type': others})}") if others else array

    def _array(self, node: dict[str, Any], depth: int) -> str:
        items = node.get("items", True)
        if not isinstance(items, (dict, bool)):
            raise Unsupported("contains", "tuple items on the path to contains")
        sep = 'WS "," WS'
        if "contains" not in node:  # the path goes on through `items`
            if node.get("minItems", 0) != 0:
                raise Unsupported("contains", "minItems on the path to contains")
            item = self.rule(items, depth + 1)
            return self._new(f'"[" WS ({item} ({sep} {item})*)? WS "]"')
        minimum = node.get("minContains", 1) if self.draft >= 2019 else 1
        if minimum == 0:  # vacuous: every array qualifies
            return self.rule({k: v for k, v in node.items() if k not in ("contains", "minContains")}, depth + 1)
        if minimum != 1 or not isinstance(node.get("minItems", 0), int) or node.get("minItems", 0) > 1:
            raise Unsupported("contains", "minContains / minItems above 1")
        item = self.rule(items, depth + 1)
        hit = self.rule({"allOf": [items, node["contains"]]}, depth + 1)
        return self._new(f'"[" WS ({item} {sep})* {hit} ({sep} {item})* WS "]"')

    def _json_leaf(self, node: Any) -> str:
        doc: Any = node
        if isinstance(node, dict):
            doc = dict(node)
            for key in ("$schema", "definitions", "$defs"):
                if key in self.root and key not in doc:
                    doc[key] = self.root[key]
        schema = self.leaf(doc)
        if schema is False:
            raise Unsupported("contains", "an item schema that accepts nothing")
        body = {} if schema is True else dict(schema)
        body["x-guidance"] = self.options
        return self._new("%json " + json.dumps(body, ensure_ascii=False))


def _types(value: Any) -> list[str] | None:
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and all(isinstance(t, str) for t in value):
        return list(value)
    return None
