"""An object node on the Lark route (schema_contains.py), keys as llguidance orders them.

Named keys come in schema order, each once, optional ones skippable; then schema_any_order's
literal free-order keys and the keys outside them, in any order: llguidance's own JSON order, so
the route accepts what the JSON path would. The rule is a graph over states (named key reached,
something emitted, the failing key seen, keys counted), pruned to states that can still close:

- `minProperties` / `maxProperties` (at most _MAX_COUNT): named keys occur once, so they count
  exactly; keys outside them may repeat in the text (a grammar cannot remember every key), so
  toward `maxProperties` each pair counts (a parsed object has at most that many keys) and toward
  `minProperties` they count as one at most (however many repeat, the parsed object has one);
  both stricter than the schema where they differ, never looser;
- a SOME_KEY marker (schema_some_key.py, "some key's value fails"): one pair whose key is of the
  marker's class holds a value of the context's schema for that key ∧ the marker's value. A named
  key occurs once, so it may fail anywhere; a key outside them must be the object's last pair:
  a parser keeps the last of repeated keys (Python's json, JavaScript), so the failing value is
  the one the parsed object holds.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from .schema_any_order import literal_pattern
from .schema_negation import Unsupported, negate
from .schema_pattern_complement import complement_pattern, pattern_matches, patterns_disjoint
from .schema_some_key import SOME_KEY, key_in, key_schema
from .schema_string_fold import fold_string_schema

if TYPE_CHECKING:
    from .schema_contains import ContainsGrammar



class Empty(Unsupported):
    """A node on the Lark route that accepts no value: its alternative is left out."""


_MAX_COUNT = 8  # minProperties / maxProperties counted in grammar states
_MAX_MARKS = 4  # failing keys asked of one object (2^k pair forms per key)
_MAX_STATES = 1024  # states of one object rule (named keys × marks met × keys counted)
MARKS = "$someKey*"  # schema_contains.merged() keeps every SOME_KEY of a node in this list
_SEP = 'WS "," WS'
State = tuple[int, int, int, int, int]  # (named index, emitted, marks met, named counted, others counted)


def object_rule(g: ContainsGrammar, node: dict[str, Any], depth: int) -> str:
    """The rule for one merged object node (Unsupported where it has no exact rule here)."""
    extra = node.get("additionalProperties", True)
    literal, open_ = split_patterns(node.get("patternProperties", {}))  # literal: schema_any_order's keys
    if set(literal) & set(node.get("properties", {})):
        raise Unsupported("contains", "a key both named and matched by a pattern")
    required = list(dict.fromkeys(node.get("required", [])))
    # required keys that are not named come first, in listing order (llguidance's order), each once;
    # one an open pattern matches is checked by those patterns (value_of), not additionalProperties
    unlisted = {k: literal.pop(k) if k in literal else True if _matching(open_, k) else extra
                for k in required if k not in node.get("properties", {})}
    props = {**unlisted, **node.get("properties", {})}
    named = {k: v for k, v in props.items() if v is not False}
    if any(k not in named for k in required):
        raise Unsupported("contains", "a required key that no value can take")
    low, high = node.get("minProperties", 0), node.get("maxProperties")
    if not isinstance(low, int) or low > _MAX_COUNT or high is not None and (not isinstance(high, int)
                                                                             or high > _MAX_COUNT):
        raise Unsupported("contains", "larger key counts than written out here")
    marks = node.get(MARKS, []) + ([node[SOME_KEY]] if SOME_KEY in node else [])
    if len(marks) > _MAX_MARKS:
        raise Unsupported("contains", "more failing keys asked of one object than written out here")
    full = (1 << len(marks)) - 1

    def pair(key_leaf: str, value: Any) -> str | None:
        """A key and its value, None where no value is allowed."""
        body = g.branch(value, depth + 1)
        return None if body is None else f'{key_leaf} WS ":" WS {body}'

    def with_marks(value: Any, chosen: int) -> Any:
        extra_values = [m["value"] for i, m in enumerate(marks) if chosen >> i & 1 and m["value"] is not True]
        return {"allOf": [value, *extra_values]} if extra_values else value

    def subsets(fits: list[bool]) -> list[int]:  # non-empty sets of marks a key may satisfy at once
        return [t for t in range(1, full + 1) if all(fits[i] for i in range(len(marks)) if t >> i & 1)]

    def last(chosen: int) -> bool:  # a key outside the named ones that must hold a failing value: the last pair
        return any(chosen >> i & 1 and m["value"] is not True for i, m in enumerate(marks))

    def value_of(key: str, own: Any) -> Any:  # a named or literal key is also checked by the open patterns it matches
        hits = _matching(open_, key)
        return own if not hits else {"allOf": [own, *(open_[p] for p in hits)]}

    names = list(named)
    outside = [*props, *literal]
    const = {k: g._json_leaf({"const": k}) for k in [*names, *literal]}
    # per named key: its pairs by the set of marks they satisfy (0: none)
    plain = [{t: pair(const[k], with_marks(value_of(k, named[k]), t))
              for t in [0, *subsets([key_in(m, k) for m in marks])]} for k in names]
    free: list[tuple[int, str | None]] = []
    for k, v in literal.items():
        if v is not False:
            free += [(t, pair(const[k], with_marks(value_of(k, v), t))) for t in [0, *subsets([key_in(m, k) for m in marks])]]
    unnamed = [not_named(outside)] if outside else []
    classes = [(unnamed + [{"pattern": p}], sub) for p, sub in open_.items()]
    if extra is not False:
        rest = [complement_pattern(p) for p in open_]
        if None not in rest:  # else some pattern matches every key: no key is additional
            classes.append((unnamed + [{"pattern": c} for c in rest], extra))
    for parts, value in classes:
        if value is False:
            continue
        keys = key_leaf_schema(_string(parts))
        if g.empty(keys):  # llguidance refuses a leaf it proves empty (every such key named, say)
            continue
        free.append((0, pair(g._json_leaf(keys), value)))
        for t in subsets([True] * len(marks)):
            keys = key_schema([m for i, m in enumerate(marks) if t >> i & 1], parts)
            keys = None if keys is None else key_leaf_schema(keys)
            if keys is not None and not g.empty(keys):
                free.append((t, pair(g._json_leaf(keys), with_marks(value, t))))
    n = len(names)
    top_n = max(low, high + 1 if high is not None else 0)
    top_u = high + 1 if high is not None else (1 if low else 0)

    def accepting(s: State) -> bool:
        return s[0] in (n, -1) and s[2] == full and s[3] + min(s[4], 1) >= low and (high is None or s[3] + s[4] <= high)

    def moves(s: State) -> list[tuple[str, State]]:
        i, e, f, cn, u = s
        lead = f"{_SEP} " if e else ""
        if i < 0:  # after a failing key outside the named ones: only the end
            return []
        if i < n:
            step = min(cn + 1, top_n)
            out = [(lead + text, (i + 1, 1, f | t, step, u)) for t, text in plain[i].items()
                   if text is not None and t & f == 0]
            if names[i] not in required:
                out.append(("", (i + 1, e, f, cn, u)))
            return out
        more = min(u + 1, top_u)
        return [(lead + text, (-1 if last(t) else n, 1, f | t, cn, more)) for t, text in free
                if text is not None and t & f == 0]

    graph: dict[State, list[tuple[str, State]]] = {}
    todo: list[State] = [(0, 0, 0, 0, 0)]
    while todo:
        s = todo.pop()
        if len(graph) > _MAX_STATES:
            raise Unsupported("contains", "an object rule with more states than written out here")
        if s not in graph:
            graph[s] = [m for m in moves(s) if high is None or m[1][3] + m[1][4] <= high]
            todo += [t for _, t in graph[s]]
    live = live_states(graph, accepting)
    start = (0, 0, 0, 0, 0)
    if start not in live:
        raise Empty("contains", "an object node that accepts no object")
    g.arrays += 1
    tag = f"o{g.arrays}"
    label = {s: f"{tag}_{k}" for k, s in enumerate(sorted(live))}
    for s in sorted(live):
        alts = [f"{text} {label[t]}".strip() for text, t in graph[s] if t in live]
        alts += ['WS "}"'] if accepting(s) else []
        g.rules.append(f"{label[s]}: " + " | ".join(alts))
    return g._new(f'"{{" WS {label[start]}')


def live_states(graph: dict[Any, list[tuple[Any, Any]]], accepting: Callable[[Any], bool]) -> set[Any]:
    """The states of a right-linear rule graph from which an accepting one can be reached."""
    live = {s for s in graph if accepting(s)}
    while True:
        more = {s for s, out in graph.items() if s not in live and any(t in live for _, t in out)}
        if not more:
            return live
        live |= more


def not_named(names: list[str]) -> dict[str, Any]:
    """The keywords of a string schema for keys other than `names` (a pattern: llguidance has no `not`)."""
    if not names:
        return {}
    neg = negate({"type": "string", "enum": sorted(set(names))}, lambda ref: True)
    strings = [b for b in neg.get("anyOf", []) if isinstance(b, dict) and b.get("type") == "string"] \
        if isinstance(neg, dict) else []
    if len(strings) != 1 or set(strings[0]) != {"type", "pattern"}:
        raise Unsupported("contains", "no pattern for the keys outside the named ones")
    return {"pattern": strings[0]["pattern"]}


def split_patterns(patterns: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """patternProperties as (literal keys: the key each matches exactly, `false` ones too, which
    keep the key out of the others; the other patterns, pairwise disjoint, else Unsupported)."""
    literal, open_ = {}, {}
    for pattern, value in patterns.items():
        key = re.sub(r"\\(.)", r"\1", pattern[1:-1]) if pattern.startswith("^") and pattern.endswith("$") else None
        if key is not None and literal_pattern(key) == pattern:
            literal[key] = value
        else:
            open_[pattern] = value
    names = list(open_)
    if any(not patterns_disjoint(p, q) for i, p in enumerate(names) for q in names[i + 1:]):
        raise Unsupported("contains", "overlapping patternProperties on the path to contains")
    return literal, open_


def _matching(patterns: dict[str, Any], key: str) -> list[str]:
    """The patterns that match `key` (Unsupported where one cannot be decided)."""
    hits = []
    for p in patterns:
        hit = pattern_matches(p, key)
        if hit is None:
            raise Unsupported("contains", f"a key pattern we cannot decide: {p!r}")
        hits += [p] if hit else []
    return hits


def _string(parts: list[dict[str, Any]]) -> dict[str, Any]:
    return {"type": "string", **parts[0]} if len(parts) == 1 else {"type": "string", "allOf": parts} if parts \
        else {"type": "string"}


def key_leaf_schema(schema: dict[str, Any]) -> dict[str, Any]:
    """A key class's string schema with its patterns folded into one where we can (llguidance
    cannot always decide whether an intersection of search patterns is empty)."""
    return fold_string_schema(schema) or schema if "allOf" in schema else schema
