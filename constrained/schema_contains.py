"""`contains` over unbounded arrays, as an llguidance Lark grammar with JSON-schema leaves.

llguidance's JSON-schema front end cannot say "at least one item matches S"; its Lark front end
can, with `%json {...}` leaves: an array of items I with an item of I ∧ S is, in effect,
`"[" (i ",")* s_and_i ("," i)* "]"` (written right-linear, so item counts and two `contains` fit).
The input is a schema vetted by schema.py with `contains` kept (Modes.contains: the keyword itself,
"some item fails" in complements, e.g. of a `oneOf` branch, and ¬contains as `items`). The array
node and its path from the root (`$ref`, allOf merged, allOf over anyOf distributed, `anyOf`,
`items`, objects in llguidance's key order) become Lark rules; every subschema that reaches no
`contains` stays one JSON-schema leaf with the `$defs` it reaches. Anything else on the path is
refused, so the route is exact or not taken. compiler.py tries it only for a schema the ordinary
vetting refuses over `contains` / "some item fails", or whose `oneOf` llguidance refuses.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from typing import Any

from .schema_lark_numbers import NOT_INTEGER_TERMINALS, number_rule, small_modulus
from .schema_lark_object import MARKS, Empty, live_states, object_rule
from .schema_meet import meet_object_fields
from .schema_negation import Unsupported
from .schema_refs import get, subschemas
from .schema_some_key import NOT_INTEGER, NOT_MULTIPLE, SOME_KEY, holds_marker
from .schema_support import VALIDATION

# Keywords a `contains` or `items` node may carry besides those the rules write out.
_ARRAY_KEYS = frozenset({"items", "contains", "minItems", "maxItems"})
_MAX_RULES = 1024
_MAX_NESTED = 4    # array leaves turned into rules inside one another (array_apart)
_DEF_REF = re.compile(r'"\$ref": "#/\$defs/([^"/]+)"')
_OBJECT_GROUP = frozenset({"properties", "patternProperties", "additionalProperties"})
_MAX_CONTAINS = 2  # contains keywords on one array node (2^k item leaves)
_MAX_COUNT = 8     # minItems / maxItems counted in grammar states
_MORE = "contains*"  # merged() keeps every `contains` of a node in this list
_TYPES = ("null", "boolean", "object", "array", "number", "string")
_TIGHTEST = {"minimum": max, "exclusiveMinimum": max, "maximum": min, "exclusiveMaximum": min}
_OBJECT_KEYS = frozenset({"properties", "required", "additionalProperties", "patternProperties",
                          "minProperties", "maxProperties"})


class ContainsGrammar:
    """Lark text for one vetted document (references `#/$defs/...`, as schema.py writes them)."""

    def __init__(self, root: dict[str, Any], empty: Callable[[Any], bool], options: dict[str, Any],
                 whitespace_max: int) -> None:
        self.root, self.empty, self.options = root, empty, options  # empty: the backend proves a leaf empty
        self.ws = f"/[\\x20\\x0A\\x0D\\x09]{{0,{whitespace_max}}}/"
        self.rules: list[str] = []
        self.arrays = self.numbers = 0  # rule-name counters
        self.max_rules = _MAX_RULES
        self.split = False  # leaves' numbers as digit rules (numbers_apart), fractions too
        self.deferred = False  # numbers left out of the first text for the digit-rule pass
        self.nested = 0  # array leaves written as rules (array_apart) inside one another
        self.fraction_rules: dict[tuple[int, int | None], str] = {}  # schema_lark_numbers' fraction digit rules
        self.fractions: set[str] = set()  # NOT_INTEGER_TERMINALS used
        self.gap_terminals: dict[str, str] = {}  # schema_number_gap's terminals: regex -> name

    def text(self) -> str:
        top = self.rule(self.root, 0)
        if self.numbers and not self.split:  # digit rules written: once more, leaves' numbers as digit rules too
            first = top, self.rules, self.arrays, self.numbers, self.fractions
            self.rules, self.arrays, self.numbers, self.fractions, self.split = [], 0, 0, set(), True
            self.fraction_rules, gaps, self.gap_terminals = {}, self.gap_terminals, {}
            try:
                top = self.rule(self.root, 0)
            except Unsupported:  # (over the rule cap, say) the first text: stricter, never looser
                if self.deferred:  # it lacks whole classes of numbers: refused instead
                    raise
                top, self.rules, self.arrays, self.numbers, self.fractions = first
                self.gap_terminals = gaps
        fraction = [f"{name}: {NOT_INTEGER_TERMINALS[name]}" for name in sorted(self.fractions)]
        fraction += [f"{name}: {regex}" for regex, name in self.gap_terminals.items()]
        return "\n".join([f"start: {top}", f"WS: {self.ws}", *fraction, *self.rules])

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
            if not isinstance(node["$ref"], str) or not node["$ref"].startswith("#/"):
                raise Unsupported("contains", f"$ref {node['$ref']!r} outside the document")
            target: Any = self.root
            for part in node["$ref"][2:].split("/"):
                part = part.replace("~1", "/").replace("~0", "~")
                if not isinstance(target, dict) or part not in target:
                    raise Unsupported("contains", f"unresolved $ref {node['$ref']!r}")
                target = target[part]
            node = target
        raise Unsupported("contains", "$ref chain too long")

    def reaches_contains(self, node: Any, seen: frozenset[str] = frozenset()) -> bool:
        if not isinstance(node, dict):
            return False
        if "contains" in node or _MORE in node or SOME_KEY in node or MARKS in node or NOT_INTEGER in node \
                or NOT_MULTIPLE in node:
            return True
        ref = node.get("$ref")
        if isinstance(ref, str) and ref not in seen and self.reaches_contains(self.resolve({"$ref": ref}),
                                                                                seen | {ref}):
            return True
        return any(self.reaches_contains(get(node, ptr), seen) for ptr in subschemas(node))

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
                raise Empty("contains", "a false allOf member")
            mine, theirs = _OBJECT_GROUP & set(out), _OBJECT_GROUP & set(member)
            if mine and theirs and (mine | theirs) != {"properties"}:
                # additionalProperties / patternProperties depend on the properties beside them
                fields = meet_object_fields(out, member, lambda ref: self.resolve({"$ref": ref}))
                if fields is None:
                    raise Unsupported("contains", "object keywords in two allOf members on the path to contains")
                out = {**{k: v for k, v in out.items() if k not in _OBJECT_GROUP}, **fields}
                member = {k: v for k, v in member.items() if k not in _OBJECT_GROUP}
            for key, value in member.items():
                if key in (SOME_KEY, MARKS) and (SOME_KEY in out or MARKS in out):  # one list of them all
                    out[MARKS] = out.get(MARKS, []) + ([out.pop(SOME_KEY)] if SOME_KEY in out else []) + \
                        (value if key == MARKS else [value])
                elif key == "properties" and "properties" in out:
                    out[key] = {**out[key], **{k: {"allOf": [out[key][k], v]} if k in out[key] else v
                                               for k, v in value.items()}}
                elif key == NOT_MULTIPLE and key in out:
                    out[key] = sorted(set(out[key]) | set(value))
                elif key == "multipleOf" and key in out and small_modulus(value) and small_modulus(out[key]):
                    out[key] = math.lcm(out[key], value)  # integer moduli: a multiple of both, of their lcm
                elif key in _TIGHTEST and key in out and _plain_number(value) and _plain_number(out[key]):
                    out[key] = _TIGHTEST[key](out[key], value)
                elif key == "required" and "required" in out:
                    out[key] = list(dict.fromkeys(out[key] + value))
                elif key == "anyOf" and "anyOf" in out:  # (A ∨ B) ∧ (C ∨ D): kept as an allOf of the two
                    out["allOf"] = out.get("allOf", []) + [{"anyOf": value}]
                elif key not in VALIDATION or key not in out:
                    out[key] = value
                elif key == "contains":
                    out[_MORE] = out[_MORE] + [value] if _MORE in out else [out.pop("contains"), value]
                elif key == "items" and isinstance(value, (dict, bool)) and isinstance(out[key], (dict, bool)):
                    out[key] = {"allOf": [out[key], value]}
                elif key == "type" and _types(value) is not None and _types(out[key]) is not None:
                    a, b = _types(out[key]), _types(value)
                    both = [t for t in a if t in b]
                    if "integer" not in both and {"integer", "number"} <= set(a) | set(b) and \
                            ("number" in a and "integer" in b or "integer" in a and "number" in b):
                        both.append("integer")
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
        if "anyOf" in keys:  # A ∧ (B ∨ C) = (A ∧ B) ∨ (A ∧ C)
            rest = {k: v for k, v in node.items() if k not in ("anyOf", _MORE, MARKS)}
            common = rest.get("allOf", []) + [{"contains": c} for c in node.get(_MORE, [])] + \
                [{"type": "object", SOME_KEY: m} for m in node.get(MARKS, [])]
            branches = [{**rest, "allOf": common + [m]} for m in node["anyOf"]]
            alts = [r for r in (self.branch(b, depth + 1) for b in branches) if r is not None]
            if not alts:
                raise Empty("contains", "an anyOf none of whose branches accepts a value")
            return self._new(" | ".join(alts))
        if NOT_INTEGER in node or NOT_MULTIPLE in node:
            return number_rule(self, node)
        kind = "object" if keys & _OBJECT_KEYS or SOME_KEY in node or MARKS in node else "array"
        allowed = _OBJECT_KEYS if kind == "object" else _ARRAY_KEYS
        if not keys <= allowed | {"type"}:
            raise Unsupported("contains", f"{sorted(keys - allowed - {'type'})} on the path to contains")
        types = _types(node.get("type", list(_TYPES)))
        if types is None or not set(types) <= set(_TYPES) | {"integer"}:
            raise Unsupported("contains", "unknown type on the path to contains")
        others = [t for t in types if t != kind]  # the kind's keywords leave other types alone
        if not types:
            raise Empty("contains", "no instance type left")
        if kind not in types:
            return self._json_leaf({"type": others})
        if "contains" in node:
            node = {**node, _MORE: node.get(_MORE, []) + [node["contains"]]}
        body = self._array(node, depth) if kind == "array" else object_rule(self, node, depth)
        return self._new(f"{body} | {self._json_leaf({'type': others})}") if others else body

    def branch(self, node: Any, depth: int) -> str | None:
        """The rule for one alternative, None where it accepts nothing (llguidance refuses an
        unsatisfiable leaf; a path node with no type left)."""
        if not self.reaches_contains(node) and self.empty(self._leaf_body(node)):
            return None
        try:
            return self.rule(node, depth)
        except Empty:
            return None

    def _array(self, node: dict[str, Any], depth: int) -> str:
        """A right-linear grammar over items: state (contains satisfied, items counted); each item
        is an I leaf or an I ∧ S... leaf for contains it satisfies first (the choice is free, so
        exact)."""
        items = node.get("items", True)
        if not isinstance(items, (dict, bool)):
            raise Unsupported("contains", "tuple items on the path to contains")
        conds = node.get(_MORE, [])
        low, high = node.get("minItems", 0), node.get("maxItems")
        if len(conds) > _MAX_CONTAINS or not isinstance(low, int) or low > _MAX_COUNT or \
                (high is not None and (not isinstance(high, int) or high > _MAX_COUNT)):
            raise Unsupported("contains", "more contains or larger item counts than written out here")
        full = (1 << len(conds)) - 1
        leaves: dict[int, str] = {}

        def leaf(chosen: int) -> str | None:
            """The item rule for these contains (None: no item satisfies all of them)."""
            if chosen not in leaves:
                parts = [items] + [c for i, c in enumerate(conds) if chosen >> i & 1]
                whole = parts[0] if len(parts) == 1 else {"allOf": parts}
                empty = not self.reaches_contains(whole) and self.empty(self._leaf_body(whole))
                leaves[chosen] = None if empty else self.branch(whole, depth + 1)
            return leaves[chosen]

        def step(state: tuple[int, int], chosen: int) -> tuple[int, int] | None:
            count = state[1] + 1
            if high is not None and count > high:
                return None
            return state[0] | chosen, count if high is not None else min(count, low)

        def accepting(state: tuple[int, int]) -> bool:
            return state[0] == full and state[1] >= low

        moves: dict[tuple[int, int], list[tuple[int, tuple[int, int]]]] = {}
        todo = [(0, 0)]
        while todo:
            state = todo.pop()
            if state in moves:
                continue
            free = full & ~state[0]
            moves[state] = [(t, nxt) for t in range(full + 1) if t & free == t and leaf(t) is not None
                            for nxt in [step(state, t)] if nxt is not None]
            todo += [nxt for _, nxt in moves[state]]
        live = live_states(moves, accepting)
        if (0, 0) not in live:
            raise Empty("contains", "an array node that accepts no array")
        self.arrays += 1
        names = {q: f"a{self.arrays}_{i}" for i, q in enumerate(sorted(live))}
        sep = 'WS "," WS'
        for q in sorted(live):
            alts = [f"{sep} {leaf(t)} {names[n]}" for t, n in moves[q] if n in live]
            alts += ['WS "]"'] if accepting(q) else []
            self.rules.append(f"{names[q]}: " + " | ".join(alts))
        first = [f'"[" WS {leaf(t)} {names[n]}' for t, n in moves[(0, 0)] if n in live]
        first += ['"[" WS "]"'] if accepting((0, 0)) else []
        return self._new(" | ".join(first))

    def _leaf_body(self, node: Any) -> Any:
        """A subschema reaching no `contains` as a document of its own (the root's `$defs`)."""
        if node is True or node is False:
            return node
        body = dict(node)
        defs = self.root.get("$defs", {})
        if defs and "$defs" not in body:  # only the definitions the leaf reaches
            reached: dict[str, Any] = {}
            todo = [body]
            while todo:
                for name in _DEF_REF.findall(json.dumps(todo.pop())):
                    if name not in reached and name in defs:
                        reached[name] = defs[name]
                        todo.append(defs[name])
            if reached:
                body["$defs"] = reached
        return body

    def numbers_apart(self, node: Any) -> str | None:
        """A leaf in a grammar with digit rules, its numbers as digit rules too: llguidance lexes
        greedily, so a JSON number lexeme where digit rules may also stand (a sibling branch, a pair
        of the same key) would read `28` whole and cut the digit rules' `2` `8` off. None where its
        numbers have no digit rules (the leaf stays: stricter there, never looser)."""
        try:
            numbers = number_rule(self, {**self.merged({"allOf": [node, {"type": "number"}]}), NOT_MULTIPLE: []})
        except Empty:
            numbers = None
        except Unsupported:
            return None
        rest = {"type": [t for t in _TYPES if t != "number"], "allOf": [node]}  # (no number: no split again)
        alts = [numbers] if numbers is not None else []
        alts += [] if self.empty(self._leaf_body(rest)) else [self._json_leaf(rest)]
        if not alts:
            raise Empty("contains", "a leaf that accepts nothing")
        return self._new(" | ".join(alts))

    def array_apart(self, node: Any) -> str | None:
        """An array leaf in a grammar with digit rules as an array rule, so its items' numbers can
        be digit rules too (the same greedy lexing, one level down). None where it is no plain array
        node or has no rule here (the leaf stays: stricter there, never looser)."""
        if self.nested >= _MAX_NESTED:
            return None
        self.nested += 1
        try:
            merged = self.merged(node)
            if not isinstance(merged, dict) or _types(merged.get("type")) != ["array"] or \
                    not {k for k in merged if k in VALIDATION} <= _ARRAY_KEYS | {"type"}:
                return None
            conds = merged.get(_MORE, []) + ([merged["contains"]] if "contains" in merged else [])
            return self._array({**merged, _MORE: conds}, 0)
        except Unsupported:
            return None
        finally:
            self.nested -= 1

    def _json_leaf(self, node: Any) -> str:
        if self.split:
            apart = self.numbers_apart(node) if _may_be_number(node) else None
            apart = self.array_apart(node) if apart is None else apart
            if apart is not None:
                return apart
        body = self._leaf_body(node)
        if holds_marker(body):
            raise Unsupported("contains", "a failing key inside a leaf")
        if body is False:
            raise Unsupported("contains", "an item schema that accepts nothing")
        body = {} if body is True else body
        return self._new("%json " + json.dumps({**body, "x-guidance": self.options}, ensure_ascii=False))


def _may_be_number(node: Any) -> bool:
    if node is True or not isinstance(node, dict):
        return node is True
    types = _types(node.get("type", "number"))
    return types is None or "number" in types or "integer" in types


def _plain_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _types(value: Any) -> list[str] | None:
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and all(isinstance(t, str) for t in value):
        return list(value)
    return None


def contains_lark(schema: Any, empty: Callable[[Any], bool], options: dict[str, Any],
                  whitespace_max: int) -> str | None:
    """Lark for a vetted schema that keeps `contains` somewhere; None where it keeps none.
    Unsupported where the path to a `contains` has no exact rule here."""
    if not isinstance(schema, dict):
        return None
    route = ContainsGrammar(schema, empty, options, whitespace_max)
    if route.reaches_contains(schema):
        return route.text()
    if holds_marker(schema):  # a failing key the route does not reach must not go to the JSON compiler
        raise Unsupported("contains", "a failing key off the route")
    return None
