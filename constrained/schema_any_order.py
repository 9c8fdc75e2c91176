"""Optional object properties in any order, for llguidance.

llguidance 1.9.1 emits and accepts named `properties` only in schema order, so a valid instance
whose keys come in another order is rejected (30 of 1,140 MaskBench dev schemas). Its
`patternProperties` keys, in contrast, come in any order after the named ones. An optional
property `k: S` says exactly what the pattern property `^k$: S` says (JSON Schema: a key in
`properties` is checked by its schema and by every pattern it matches, and is not "additional";
the literal pattern matches `k` and nothing else), so moving the optional properties of an object
schema into literal patterns keeps its language and frees their order. Required properties stay
named (a pattern cannot make a key present), hence first and in schema order.

Applied only where it is exact for the backend as well:
- the node is not intersected with another schema by llguidance (an `allOf` part, an `anyOf`
  with sibling keywords, or anything reached from those, references included): its merge of
  named properties with patterns is not ours to rely on;
- the node has no `patternProperties` of its own (llguidance requires disjoint patterns) and no
  `minProperties`/`maxProperties` (see below).

Duplicate keys. A grammar cannot remember which of unboundedly many keys it has seen, so a
pattern key may occur twice in the text (`{"a": 1, "a": 2}`), as additional keys already may.
Parsed JSON has no duplicates (last one wins in Python's json, JavaScript, and jsonschema's
input); every occurrence satisfies the key's schema, so whichever occurrence a parser keeps, the
parsed object is valid for per-key constraints. Key counts would not be (two occurrences could
meet `minProperties: 2` while the parsed object has one key): nodes with property counts keep
their named properties, except where every named property that may occur is required (then
only `false` ones become patterns, and no key can repeat).
"""

from __future__ import annotations

import itertools
import re
from typing import Any

MAX_PERMUTED = 3  # required keys in any order up to 3! = 6 orders per object node
# llguidance checks pattern properties pairwise for disjointness: compile time grows with the
# square of their count (a node of 128 literal keys: 67 -> 810 ms), so larger nodes keep schema order.
MAX_PATTERNS = 96
# The alphabetical-order branch: for nodes of at most 12 named keys, the first 8 such nodes of a
# document (root first): each is one more copy for llguidance to build (measured negligible on
# o17072, 8 such nodes in a oneOf of object types; the caps bound the worst case).
MAX_ALPHABETICAL = 12
# Nodes of at most 3 named keys (`false` ones aside) with a required and an optional one also take
# every order of all their named keys (at most 6 more copies, named keys only: no key can repeat):
# an optional key between required ones, or before a required one out of schema order, which the
# forms above cannot take. Measured on the 234 dev schemas it changes: compile p50 7.3 -> 8.6 ms,
# mask time unchanged (RESULTS.md, cov16).
MAX_ALL_ORDERS = 3
MAX_ALPHABETICAL_NODES = 8

# Applicators whose subschemas llguidance intersects with the node that holds them (or with
# each other): `allOf` always, `anyOf`/`oneOf` when the node has other validation keywords.
_BRANCHES = ("anyOf", "oneOf")
_CHILD_MAPS = ("properties", "patternProperties", "$defs")
_CHILDREN = ("items", "additionalProperties", "not", "contains", "propertyNames")
_CHILD_LISTS = ("prefixItems",)
_BRANCH_SIBLINGS_IGNORED = frozenset({"$defs"})


def _children(node: dict[str, Any]) -> list[Any]:
    out: list[Any] = []
    for key in _CHILD_MAPS:
        if isinstance(node.get(key), dict):
            out.extend(node[key].values())
    for key in _CHILDREN:
        if key in node:
            out.append(node[key])
    for key in (*_CHILD_LISTS, "allOf", *_BRANCHES):
        if isinstance(node.get(key), list):
            out.extend(node[key])
    return out


def _merged_nodes(root: dict[str, Any], defs: dict[str, Any]) -> set[int]:
    """ids of every node llguidance may intersect with another schema, and all below them."""
    merged: set[int] = set()
    seen_defs: set[str] = set()

    def mark(node: Any) -> None:  # node and its whole subtree, references followed
        if not isinstance(node, dict) or id(node) in merged:
            return
        merged.add(id(node))
        ref = node.get("$ref")
        if isinstance(ref, str):
            name = ref.rsplit("/", 1)[-1]
            if name in defs:
                mark(defs[name])
        for child in _children(node):
            mark(child)

    def walk(node: Any) -> None:
        if not isinstance(node, dict) or id(node) in merged:
            return
        siblings = [k for k in node if k not in _BRANCHES and k not in _BRANCH_SIBLINGS_IGNORED]
        intersected = "allOf" in node or any(k in node for k in _BRANCHES) and bool(siblings) \
            or "$ref" in node and len(siblings) > 1 or sum(k in node for k in _BRANCHES) > 1
        if intersected:
            mark(node)
            return
        ref = node.get("$ref")
        if isinstance(ref, str) and ref.rsplit("/", 1)[-1] in defs:
            name = ref.rsplit("/", 1)[-1]
            if name not in seen_defs:
                seen_defs.add(name)
                walk(defs[name])
        for child in _children(node):
            walk(child)

    walk(root)
    for name, target in defs.items():  # definitions reached only from merged places
        if name not in seen_defs:
            walk(target)
    return merged


def _unmatched(key: str, patterns: dict[str, Any]) -> bool:
    """True if no existing pattern can match `key` (llguidance requires disjoint patterns; a
    pattern we cannot read counts as matching) and the key has no control characters."""
    if any(c < " " for c in key):
        return False
    try:
        return not any(re.search(p, key) for p in patterns)
    except re.error:
        return False


def literal_pattern(key: str) -> str:
    """An anchored regex matching exactly `key` (ASCII punctuation escaped; llguidance's and
    ECMA's syntax agree on `\\` before punctuation except `<` and `>`, word assertions to
    llguidance: those two, plain characters in both syntaxes, stay unescaped)."""
    out = []
    for ch in key:
        if ch.isascii() and not ch.isalnum() and ch not in "_ <>":
            out.append("\\" + ch)
        else:
            out.append(ch)
    return "^" + "".join(out) + "$"


def free_optional_order(schema: Any, max_permuted: int = MAX_PERMUTED, max_patterns: int = MAX_PATTERNS) -> int:
    """Rewrites, in place, every eligible object node; returns how many changed.

    The node's language in llguidance is "named properties as a subsequence in schema order,
    then pattern keys in any order". Optional properties after the last required one become
    literal patterns (a superset of schema order, same schema). Where keys could still come in
    an order that form rejects (a required key after an optional one, or several required keys),
    the node becomes an `anyOf` of that form and of "required keys in each order (up to
    `max_permuted` of them), then every optional key in any order"; past `max_permuted`
    required keys, the second form takes them in the order `required` lists them."""
    if not isinstance(schema, dict):
        return 0
    defs = schema.get("$defs", {})
    merged = _merged_nodes(schema, defs)
    eligible: list[dict[str, Any]] = []
    stack: list[Any] = [*reversed(defs.values()), schema]  # the root first
    visited: set[int] = set()
    while stack:
        node = stack.pop()
        if not isinstance(node, dict) or id(node) in visited:
            continue
        visited.add(id(node))
        stack.extend(_children(node))
        if id(node) not in merged and isinstance(node.get("properties"), dict) and node["properties"] \
                and (("minProperties" not in node and "maxProperties" not in node) or _only_required(node)):
            eligible.append(node)
    budget = [MAX_ALPHABETICAL_NODES]
    changed = sum(_free(node, defs, max_permuted, max_patterns, budget) for node in eligible)
    if defs and "$defs" not in schema:
        schema["$defs"] = defs
    return changed


SCHEMA_KEY = "$schema"
# Keywords next to which a node gets no leading-$schema copy: llguidance intersects the node with
# them, or they depend on which keys are named / counted.
_LEADING_BLOCKERS = frozenset({"allOf", "anyOf", "oneOf", "$ref", "not", "if", "then", "else", "minProperties",
                               "maxProperties", "propertyNames", "unevaluatedProperties", "dependentSchemas",
                               "dependentRequired", "dependencies"})


def lead_with_schema_key(root: Any) -> int:
    """Documents often open with `"$schema": ...` (JsonSchemaStore files). Where the root names
    required keys but not `$schema`, that key is additional, and llguidance takes it only after the
    named ones. Runs after free_optional_order: the root (or, where the root is a bare `anyOf`, its
    first such branch — free_optional_order's schema-order form) gets a copy beside it that
    requires `$schema` first, with the schema an additional key has (`additionalProperties`, else
    anything). The copy is the node's language where `$schema` is present (a named key is checked
    by the schema that checked it as an additional key, and no pattern matches it), so the union
    is the node's; only the orders grow, by one object form. Required, the key is all the copy
    adds to the first key's choices (the mask there), and the copy ends the plain form's run at
    once."""
    if not isinstance(root, dict):
        return 0
    branches = root.get("anyOf") if set(root) <= {"anyOf", "$defs"} else [root]
    node = next((b for b in branches or () if _leads(b)), None) if isinstance(branches, list) else None
    if node is None:
        return 0
    defs = root.setdefault("$defs", {})
    extra = node["additionalProperties"] = hoist(node.get("additionalProperties", True), defs)
    leading = {**node, "properties": {SCHEMA_KEY: extra, **node["properties"]}, "required": [SCHEMA_KEY, *node["required"]]}
    if "patternProperties" in node:
        leading["patternProperties"] = dict(node["patternProperties"])
    if node is root:
        plain = {k: v for k, v in root.items() if k != "$defs"}
        root.clear()
        root.update(anyOf=[plain, leading], **({"$defs": defs} if defs else {}))
    else:
        branches.append(leading)
        if not defs:
            del root["$defs"]
    return 1


def _leads(node: Any) -> bool:
    """An object node naming a required key, where an additional `$schema` key may occur but not first."""
    if not isinstance(node, dict) or _LEADING_BLOCKERS & set(node) or node.get("type", "object") != "object":
        return False
    props, required = node.get("properties"), node.get("required")
    return isinstance(props, dict) and SCHEMA_KEY not in props and isinstance(required, list) \
        and any(k in props for k in required) and node.get("additionalProperties", True) is not False \
        and _unmatched(SCHEMA_KEY, node.get("patternProperties", {}))


def alphabetical_order(names: list[str]) -> list[str] | None:
    """The names sorted, where that is another order: instances written with sorted keys
    (json.dumps(sort_keys=True)) interleave optional and required keys that way."""
    order = sorted(names)
    return order if order != names else None


def _only_required(node: dict[str, Any]) -> bool:
    """Every named property that may occur is required (open_count's copies): none becomes a
    pattern key that could repeat, so key counts stay exact."""
    required = set(node.get("required", ()))
    return all(v is False or k in required for k, v in node["properties"].items())


def _free(node: dict[str, Any], defs: dict[str, Any], max_permuted: int, max_patterns: int,
          budget: list[int]) -> bool:
    props, patterns = node["properties"], node.get("patternProperties", {})
    required = set(node.get("required", ()))
    names = list(props)
    if not required <= set(names):  # llguidance places unlisted required keys after the listed ones
        return False
    movable = [k for k in names if k not in required and _unmatched(k, patterns)]
    if len(movable) + len(patterns) > max_patterns:
        return False
    last = max((i for i, k in enumerate(names) if k in required), default=-1)
    tail = [k for k in movable if names.index(k) > last]
    ordered = [k for k in names if k in required]
    permute = 1 <= len(ordered) <= max_permuted and (len(ordered) > 1 or len(tail) < len(movable))
    # Past the permutation cap, instances often list required keys in `required` order.
    listed = [k for k in node.get("required", ()) if k in props]
    listed = list(dict.fromkeys(listed))
    by_listing = len(ordered) > max_permuted and listed != ordered
    # no required key: `first` takes any order already; large nodes: a second copy costs compile time
    alphabetical = alphabetical_order(names) if required and len(names) <= MAX_ALPHABETICAL and budget[0] else None
    budget[0] -= alphabetical is not None
    if not tail and not permute and not by_listing and alphabetical is None:
        return False
    if permute or by_listing or alphabetical:  # values become references first: compiled once, not once per branch
        for table in (props, patterns):
            for key, value in table.items():
                table[key] = hoist(value, defs)
        if "additionalProperties" in node:
            node["additionalProperties"] = hoist(node["additionalProperties"], defs)
    rest = {k: v for k, v in node.items() if k not in ("properties", "patternProperties", "$defs")}

    def form(named: list[str], free: list[str]) -> dict[str, Any]:
        out: dict[str, Any] = {"properties": {k: props[k] for k in named}, **rest}
        if patterns or free:
            out["patternProperties"] = {**patterns, **{literal_pattern(k): props[k] for k in free}}
        if not out["properties"]:
            del out["properties"]
        return out

    first = form([k for k in names if k not in tail], tail)
    by_name = []
    if alphabetical:  # named keys in alphabetical order, optional ones after the last required free
        a_last = max(i for i, k in enumerate(alphabetical) if k in required)
        a_tail = [k for k in alphabetical[a_last + 1:] if k in movable]
        by_name.append(form([k for k in alphabetical if k not in a_tail], a_tail))
    if not permute and not by_listing and not by_name:
        keep = {"$defs": node["$defs"]} if "$defs" in node else {}
        node.clear()
        node.update(first, **keep)
        return True
    fixed = [k for k in names if k not in required and k not in movable]  # kept named, schema order
    orders = itertools.permutations(ordered) if permute else [listed] if by_listing else []
    branches = [first] + [form([*order, *fixed], movable) for order in orders] + by_name
    live = [k for k in names if props[k] is not False]
    if len(live) <= MAX_ALL_ORDERS and required and set(live) - required:  # optional keys between required ones
        forbidden = [k for k in names if props[k] is False]
        branches += [form([*order, *forbidden], []) for order in itertools.permutations(live)]
    keep = {"$defs": node["$defs"]} if "$defs" in node else {}
    node.clear()
    node.update(anyOf=branches, **keep)
    return True


def hoist(value: Any, defs: dict[str, Any]) -> Any:
    if not isinstance(value, dict) or not value or list(value) == ["$ref"]:
        return value
    name = f"o{len(defs)}"
    while name in defs:
        name += "_"
    defs[name] = value
    return {"$ref": f"#/$defs/{name}"}
