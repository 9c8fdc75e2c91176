"""Where `uniqueItems` over open item sets must hold, as an automaton over instance paths.

A grammar cannot remember which of unboundedly many items it has produced, so `uniqueItems: true`
over strings, objects or any value is left out of the grammar and checked beside it at run time
(unique_check.py). The check knows only the path of an array (object keys and item indices from
the root), so an array is checked where *any* way the vetted schema can validate a value at that
path (an anyOf/oneOf alternative, each a conjunction of allOf members and `$ref` targets) that
admits an array asks for unique items. Where every such alternative asks, this is exact: a valid
instance never meets the check, and a duplicate-free instance the loosened grammar accepts is valid
(every dropped `uniqueItems` sits at a checked path, so each subschema evaluates on it as in the
schema). Where only some ask (an `if`/`then` on a sibling's value: which alternative holds is
not known from the path), repeated items there are refused for the others too: stricter than the
schema, never looser — as leap seconds and key orders are. Paths are walked as a small
deterministic automaton: named keys, "any other key", prefix indices, "any later index".
Subschemas that reach no such `uniqueItems` are summarized by the JSON types they admit.
Anything else (a unique array below `not`, `contains`, `if`, pattern-keyed properties; too many
states) raises Unsupported naming the reason.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from itertools import product
from typing import Any

from .schema_finite import listed_values
from .schema_negation import Unsupported

ALL_TYPES = frozenset(("null", "boolean", "object", "array", "number", "string"))
SINK = -1  # no unique array at or below this path
MAX_STATES = 2000
MAX_ALTERNATIVES = 256
_MAX_DEPTH = 40
_CHILD_LISTS = ("allOf", "anyOf", "oneOf", "prefixItems")
_CHILD_MAPS = ("properties", "patternProperties", "dependentSchemas", "$defs", "definitions")
_CHILD_ONE = ("items", "additionalProperties", "not", "if", "then", "else", "contains", "propertyNames",
              "additionalItems", "unevaluatedItems", "unevaluatedProperties")
_UNMODELLED = ("not", "if", "then", "else", "contains", "propertyNames", "additionalItems",
               "unevaluatedItems", "unevaluatedProperties", "dependentSchemas", "patternProperties")

Alternative = tuple[frozenset[int], frozenset[str]]  # (ids of nodes that reach a unique array, types admitted)


@dataclass(frozen=True)
class UniquePaths:
    """The automaton: per state, whether an array there must be unique, and its moves."""

    enforce: tuple[bool, ...]
    keys: tuple[dict[str, int], ...]      # named key -> state
    other_key: tuple[int, ...]            # any other key
    indices: tuple[tuple[int, ...], ...]  # item 0, 1, ... (prefixItems)
    later_index: tuple[int, ...]          # any later item
    start: int
    distinct_keys: bool = False           # objects may not repeat a key (`counts_keys`): all of them, or
    distinct_at: tuple[bool, ...] = ()    # where given, those at states marked here only
    item_values: tuple[tuple[tuple[Any, Any], ...] | None, ...] = ()  # per state: listed items (value,
                                          # canonical form) of a unique array there, or None
    key_names: tuple[tuple[str, ...] | None, ...] = ()  # per state where keys are checked: every name an
                                          # object there can have, or None (unique_keys.key_names)
    alive: dict[Any, bool] = field(default_factory=dict, compare=False, repr=False)  # unique_items_left's memo

    def key_step(self, state: int, key: str) -> int:
        return SINK if state == SINK else self.keys[state].get(key, self.other_key[state])

    def index_step(self, state: int, index: int) -> int:
        if state == SINK:
            return SINK
        fixed = self.indices[state]
        return fixed[index] if index < len(fixed) else self.later_index[state]

    def payload(self) -> Any:
        return (self.enforce, self.keys, self.other_key, self.indices, self.later_index, self.start,
                self.distinct_keys, self.distinct_at,
                [None if v is None else [x for x, _ in v] for v in self.item_values], self.key_names)

    @staticmethod
    def from_payload(data: Any) -> UniquePaths:
        enforce, keys, other, indices, later, start, distinct, distinct_at, values, names = data
        return UniquePaths(tuple(enforce), tuple(dict(k) for k in keys), tuple(other),
                           tuple(tuple(i) for i in indices), tuple(later), start, distinct, tuple(distinct_at),
                           tuple(_with_canonical(v) for v in values), tuple(names))

    def keys_checked(self, state: int) -> bool:
        """Must an object at this path state repeat no key?"""
        if not self.distinct_keys:
            return False
        return not self.distinct_at or state != SINK and self.distinct_at[state]


MAX_LISTED_ITEMS = 64  # listed items of a unique array looked at for dead ends (unique_items_left.py)


def _with_canonical(values: list[Any] | None) -> tuple[tuple[Any, Any], ...] | None:
    from .unique_scan import parse_item

    return None if values is None else tuple((v, parse_item(json.dumps(v).encode())) for v in values)


NO_UNIQUE_ARRAYS = UniquePaths((), (), (), (), (), SINK)


def counted(node: dict[str, Any]) -> bool:
    low = node.get("minProperties")
    return isinstance(low, (int, float)) and not isinstance(low, bool) and low >= 2


def subschemas(node: dict[str, Any]) -> list[tuple[str, Any]]:
    """(keyword, subschema) for every schema-valued place of `node` ($ref not followed)."""
    out: list[tuple[str, Any]] = []
    for key, value in node.items():
        if key in _CHILD_LISTS and isinstance(value, list):
            out += [(key, v) for v in value]
        elif key in _CHILD_MAPS and isinstance(value, dict):
            out += [(key, v) for v in value.values()]
        elif key in _CHILD_ONE and isinstance(value, (dict, bool)):
            out.append((key, value))
    return out


def schema_nodes(schema: Any) -> list[dict[str, Any]]:
    seen: dict[int, dict[str, Any]] = {}
    stack = [schema]
    while stack:
        node = stack.pop()
        if isinstance(node, dict) and id(node) not in seen:
            seen[id(node)] = node
            stack += [v for _, v in subschemas(node)]
    return list(seen.values())


def has_unique(schema: Any) -> bool:
    """Some `uniqueItems: true` is left in the vetted schema (open item sets)."""
    return any(n.get("uniqueItems") is True for n in schema_nodes(schema))


def strip_unique(schema: Any) -> None:
    """Drop every `uniqueItems` in place (the run-time check enforces them)."""
    for node in schema_nodes(schema):
        node.pop("uniqueItems", None)


class _Analysis:
    def __init__(self, root: dict[str, Any], counted: bool = False) -> None:
        self.root, self.counted = root, counted
        self.defs = root.get("$defs", {}) if isinstance(root, dict) else {}
        self.nodes: dict[int, dict[str, Any]] = {}
        self.reach = self._reaching()
        self.type_memo: dict[int, frozenset[str]] = {}

    def deref(self, ref: str) -> Any:
        if ref == "#":
            return self.root
        if not ref.startswith("#/$defs/") or ref[8:] not in self.defs:
            raise Unsupported("uniqueItems", f"a unique array behind the reference {ref!r}")
        return self.defs[ref[8:]]

    def _children(self, node: dict[str, Any]) -> list[tuple[str, Any]]:
        out = subschemas(node)
        if isinstance(node.get("$ref"), str):
            out.append(("$ref", self.deref(node["$ref"])))
        return out

    def _reaching(self) -> set[int]:
        """Ids of schema objects from which a `uniqueItems: true` can be reached (fixed point)."""
        edges: dict[int, list[int]] = {}
        marked: set[int] = set()
        stack: list[Any] = [self.root]
        while stack:
            node = stack.pop()
            if not isinstance(node, dict) or id(node) in self.nodes:
                continue
            self.nodes[id(node)] = node
            if node.get("uniqueItems") is True or self.counted and counted(node):
                marked.add(id(node))
            kids = [v for key, v in self._children(node) if key not in ("$defs", "definitions")]
            edges[id(node)] = [id(v) for v in kids if isinstance(v, dict)]
            stack += kids
        reach = set(marked)
        changed = True
        while changed:
            changed = False
            for nid, outs in edges.items():
                if nid not in reach and any(o in reach for o in outs):
                    reach.add(nid)
                    changed = True
        for nid in reach:  # a unique array under a keyword the path walk does not model
            node = self.nodes[nid]
            for key, v in self._children(node):
                if key in _UNMODELLED and isinstance(v, dict) and id(v) in reach:
                    raise Unsupported("uniqueItems", f"a unique array under {key!r}")
            if node.get("patternProperties") and isinstance(node.get("additionalProperties"), dict) \
                    and id(node["additionalProperties"]) in reach:
                raise Unsupported("uniqueItems", "a unique array under additionalProperties next to patternProperties")
        return reach

    def types(self, node: Any, depth: int = 0) -> frozenset[str]:
        """JSON types a schema admits (a superset; integers count as numbers)."""
        if node is True or depth > _MAX_DEPTH:
            return ALL_TYPES
        if node is False or not isinstance(node, dict):
            return frozenset() if node is False else ALL_TYPES
        hit = self.type_memo.get(id(node))
        if hit is not None:
            return hit
        self.type_memo[id(node)] = ALL_TYPES  # a cycle reads as "anything"
        out = self.local_types(node)
        for m in node.get("allOf", ()):
            out &= self.types(m, depth + 1)
        for key in ("anyOf", "oneOf"):
            if isinstance(node.get(key), list):
                out &= frozenset().union(*(self.types(m, depth + 1) for m in node[key]))
        if isinstance(node.get("$ref"), str):
            out &= self.types(self.deref(node["$ref"]), depth + 1)
        self.type_memo[id(node)] = out
        return out

    @staticmethod
    def local_types(node: dict[str, Any]) -> frozenset[str]:
        out = ALL_TYPES
        kinds = node.get("type")
        if isinstance(kinds, str):
            kinds = [kinds]
        if isinstance(kinds, list):
            out = frozenset("number" if k == "integer" else k for k in kinds) & ALL_TYPES
        for values in ([node["const"]] if "const" in node else None, node.get("enum")):
            if isinstance(values, list):
                out &= frozenset(_type_of(v) for v in values)
        return out

    def alternatives(self, node: Any, depth: int = 0) -> list[Alternative]:
        """The ways `node` can hold: conjunctions of reaching nodes, with the types each admits."""
        if node is True:
            return [(frozenset(), ALL_TYPES)]
        if node is False:
            return []
        if not isinstance(node, dict) or id(node) not in self.reach:
            kinds = self.types(node)
            return [(frozenset(), kinds)] if kinds else []
        if depth > _MAX_DEPTH:
            raise Unsupported("uniqueItems", "unique arrays behind a cycle of references without a value between")
        out: list[Alternative] = [(frozenset((id(node),)), self.local_types(node))]
        parts = [[m] for m in node.get("allOf", ())]
        parts += [node[k] for k in ("anyOf", "oneOf") if isinstance(node.get(k), list)]
        if isinstance(node.get("$ref"), str):
            parts.append([self.deref(node["$ref"])])
        for options in parts:
            choice = [a for m in options for a in self.alternatives(m, depth + 1)]
            out = _meet(out, choice)
        return out

    def child(self, alts: frozenset[Alternative], step: Any) -> frozenset[Alternative]:
        """The alternatives at a key (str), "other key" (None, object), an index (int) or a later index."""
        out: set[Alternative] = set()
        want = "object" if step is None or isinstance(step, str) else "array"
        for ids, kinds in alts:
            if want not in kinds:
                continue
            found: list[Alternative] = [(frozenset(), ALL_TYPES)]
            for nid in ids:
                sub = _child_schema(self.nodes[nid], step)
                if sub is not True:
                    found = _meet(found, self.alternatives(sub))
            out.update(found)
        return frozenset(out)

    def bounded(self, alts: frozenset[Alternative], kind: str,
                bound_of: Callable[[dict[str, Any]], list[Any] | None]) -> list[Any] | None:
        """Over the alternatives admitting `kind`: the union of each one's smallest bound (a node's
        `bound_of`: every value it allows at most), or None where some alternative has none."""
        out: list[Any] = []
        for ids, kinds in alts:
            if kind not in kinds:
                continue
            bound: list[Any] | None = None
            for nid in ids:
                found = bound_of(self.nodes[nid])
                if found is not None and (bound is None or len(found) < len(bound)):
                    bound = found
            if bound is None:
                return None
            out += bound  # repeats kept: 1 == True in Python, not in JSON Schema
        return out

    def item_values(self, alts: frozenset[Alternative]) -> list[Any] | None:
        """The values an item of a unique array here can take at most (listed items, any index)."""
        def items(node: dict[str, Any]) -> list[Any] | None:
            lists = [self._listed(sub) for sub in (node.get("items", True), *node.get("prefixItems", ()))]
            return None if any(x is None for x in lists) else [v for x in lists for v in x]  # type: ignore[union-attr]

        out = self.bounded(alts, "array", items)
        return out if out is not None and len(out) <= MAX_LISTED_ITEMS else None

    def _listed(self, sub: Any, depth: int = 0) -> list[Any] | None:
        """Values `sub` accepts at most: its enum/const, else its `$ref`'s, else the union of its
        anyOf/oneOf branches' where each is listed (a superset is enough: see item_values)."""
        if not isinstance(sub, dict) or depth > 8:
            return None
        found = listed_values(sub)
        if found is None and isinstance(sub.get("$ref"), str):
            try:
                found = self._listed(self.deref(sub["$ref"]), depth + 1)
            except Unsupported:
                return None
        for key in ("anyOf", "oneOf"):
            branches = sub.get(key)
            if found is None and isinstance(branches, list) and branches:
                lists = [self._listed(b, depth + 1) for b in branches]
                if all(x is not None for x in lists):
                    found = [v for x in lists for v in x]  # type: ignore[union-attr]
        return found

    def decide_keys(self, alts: frozenset[Alternative]) -> bool:
        """Keys distinct where any alternative admitting an object counts them (minProperties >= 2)."""
        return any(counted(self.nodes[n]) for ids, kinds in alts if "object" in kinds for n in ids)

    def decide(self, alts: frozenset[Alternative]) -> bool:
        """Unique where any alternative admitting an array asks for it: where others do not (an
        `if`/`then` on a sibling's value), repeated items are refused for them too — stricter than
        the schema there, never looser (every dropped `uniqueItems` sits at a checked path)."""
        return any(self.nodes[n].get("uniqueItems") is True for ids, kinds in alts if "array" in kinds for n in ids)


def _type_of(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    return {str: "string", list: "array", dict: "object"}.get(type(value), "string")


def _meet(left: list[Alternative], right: list[Alternative]) -> list[Alternative]:
    out = {(a | c, b & d) for (a, b), (c, d) in product(left, right) if b & d}
    if len(out) > MAX_ALTERNATIVES:
        raise Unsupported("uniqueItems", f"more than {MAX_ALTERNATIVES} alternatives at one path")
    return list(out)


def _child_schema(node: dict[str, Any], step: Any) -> Any:
    if isinstance(step, str) or step is None:
        props = node.get("properties", {})
        if isinstance(step, str) and step in props:
            return props[step]
        return node.get("additionalProperties", True) if not node.get("patternProperties") else True
    prefix = node.get("prefixItems", ())
    if isinstance(step, int) and step < len(prefix):
        return prefix[step]
    return node.get("items", True)


def unique_paths(schema: Any, counted: bool = False) -> UniquePaths:
    """The automaton for a vetted schema with `uniqueItems: true` left in it (or Unsupported);
    `counted`: also where objects must repeat no key (`counts_keys`)."""
    if not isinstance(schema, dict):
        raise Unsupported("uniqueItems", "not a schema object")
    from .unique_keys import key_names  # it builds on this module

    a = _Analysis(schema, counted)
    index: dict[frozenset[Alternative], int] = {}
    order: list[frozenset[Alternative]] = []

    def state(alts: frozenset[Alternative]) -> int:
        if not any(ids for ids, _ in alts):
            return SINK
        if alts not in index:
            if len(order) >= MAX_STATES:
                raise Unsupported("uniqueItems", f"more than {MAX_STATES} path states")
            index[alts] = len(order)
            order.append(alts)
        return index[alts]

    start = state(frozenset(a.alternatives(schema)))
    enforce: list[bool] = []
    keys: list[dict[str, int]] = []
    other: list[int] = []
    indices: list[tuple[int, ...]] = []
    later: list[int] = []
    values: list[Any] = []
    distinct: list[bool] = []
    names: list[tuple[str, ...] | None] = []
    i = 0
    while i < len(order):  # breadth first; `order` grows as new states appear
        alts = order[i]
        enforce.append(a.decide(alts))
        values.append(a.item_values(alts) if enforce[-1] else None)
        distinct.append(counted and a.decide_keys(alts))
        names.append(key_names(a, alts) if distinct[-1] else None)
        named = sorted({k for ids, kinds in alts if "object" in kinds for n in ids
                        for k in a.nodes[n].get("properties", {})})
        keys.append({k: state(a.child(alts, k)) for k in named})
        other.append(state(a.child(alts, None)))
        prefix = max((len(a.nodes[n].get("prefixItems", ())) for ids, _ in alts for n in ids), default=0)
        indices.append(tuple(state(a.child(alts, j)) for j in range(prefix)))
        later.append(state(a.child(alts, prefix)))
        i += 1
    return UniquePaths(tuple(enforce), tuple(keys), tuple(other), tuple(indices), tuple(later), start,
                       distinct_keys=counted, distinct_at=tuple(distinct) if counted else (),
                       item_values=tuple(_with_canonical(v) for v in values), key_names=tuple(names))
