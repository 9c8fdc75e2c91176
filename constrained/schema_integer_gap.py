"""Number ranges llguidance gets wrong, sent to the Lark route before it sees them.

llguidance 1.9's number ranges take the excluded integer of an exclusive bound when no integer lies
inside the range next to it: `{"exclusiveMinimum": 0, "maximum": 0.5}` accepts `0`, `{"minimum":
-1.5, "exclusiveMaximum": -1}` accepts `-1` (benchmarks/schema_fuzz.py found it). Ranges with an
integer inside, and the bounds toward zero (`exclusiveMinimum: -1`, `exclusiveMaximum: 0`), are
exact. Such a range is made of non-integers only, so the node is marked NOT_INTEGER (exact), which
the Lark route writes as one terminal (schema_number_gap.py) or refuses. llguidance intersects a node with its
`allOf` members (through `$ref`) and with each `anyOf`/`oneOf` branch, so their bounds are met first.
"""

from __future__ import annotations

from typing import Any, Callable

from .schema_some_key import NOT_INTEGER

Bound = tuple[float, bool]  # value, exclusive
_LOWER, _UPPER = ("minimum", "exclusiveMinimum"), ("maximum", "exclusiveMaximum")


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _numeric(node: Any) -> bool:
    """Whether the node's own `type` lets a number through (bounds on other types are vacuous)."""
    types = node.get("type") if isinstance(node, dict) else None
    types = [types] if isinstance(types, str) else types
    return not isinstance(types, list) or "number" in types or "integer" in types


def _tighter(a: Bound | None, b: Bound | None, lower: bool) -> Bound | None:
    if a is None or b is None:
        return a or b
    if a[0] != b[0]:
        return a if (a[0] > b[0]) == lower else b
    return a if a[1] else b  # same value: the exclusive one is tighter


def _range(node: Any, defs: dict[str, Any], seen: frozenset[int] = frozenset()) -> tuple[Bound | None, Bound | None]:
    """The tightest lower and upper bounds of a node met with its allOf members and references."""
    if not isinstance(node, dict) or id(node) in seen:
        return None, None
    seen |= {id(node)}
    lo = hi = None
    for key in _LOWER:
        if _number(node.get(key)):
            lo = _tighter(lo, (node[key], key.startswith("exclusive")), True)
    for key in _UPPER:
        if _number(node.get(key)):
            hi = _tighter(hi, (node[key], key.startswith("exclusive")), False)
    parts = list(node.get("allOf", [])) if isinstance(node.get("allOf"), list) else []
    ref = node.get("$ref")
    if isinstance(ref, str) and ref.startswith("#/$defs/"):
        parts.append(defs.get(ref[len("#/$defs/"):]))
    for part in parts:
        plo, phi = _range(part, defs, seen)
        lo, hi = _tighter(lo, plo, True), _tighter(hi, phi, False)
    return lo, hi


def gap_bound(lo: Bound | None, hi: Bound | None) -> str | None:
    """The exclusive bound llguidance would let through on this range, or None."""
    if lo and hi and lo[1] and lo[0] == int(lo[0]) and lo[0] >= 0:
        n = lo[0]
        if hi[0] < n + 1:  # (n, n + 1) itself is exact
            return "exclusiveMinimum"
    if lo and hi and hi[1] and hi[0] == int(hi[0]) and hi[0] <= -1:
        n = hi[0]
        if lo[0] > n - 1:
            return "exclusiveMaximum"
    return None


REASON = "an exclusive integer bound on a range with no integer inside (llguidance takes the excluded integer)"


def mark_integer_gaps(schema: Any, refuse: Callable[[str, tuple[str, ...], str], None], mark: bool) -> None:
    """Walk the schema handed to llguidance; `refuse(keyword, pointer, REASON)` each such range,
    or with `mark` (the Lark retry, compiler._contains_retry) mark it NOT_INTEGER, exact as it
    holds no integer: the route writes it as schema_number_gap's terminal (or refuses it)."""
    defs = schema.get("$defs", {}) if isinstance(schema, dict) else {}

    def visit(node: Any, ptr: tuple[str, ...]) -> None:
        if isinstance(node, list):
            for i, x in enumerate(node):
                visit(x, ptr + (str(i),))
            return
        if not isinstance(node, dict):
            return
        lo, hi = _range(node, defs)
        keyword = _numeric(node) and gap_bound(lo, hi)
        if keyword and mark:
            node[NOT_INTEGER] = True
        elif keyword:
            refuse(keyword, ptr, REASON)
        for k in ("anyOf", "oneOf"):
            branches = node.get(k) if _numeric(node) and not keyword else None
            for i, b in enumerate(branches if isinstance(branches, list) else []):
                blo, bhi = _range(b, defs)
                keyword = _numeric(b) and gap_bound(_tighter(lo, blo, True), _tighter(hi, bhi, False))
                if keyword and mark and isinstance(b, dict):  # a copy: the branch's meaning here only
                    branches[i] = {**b, NOT_INTEGER: True}
                elif keyword:
                    refuse(keyword, ptr, REASON)
        for key, sub in node.items():
            if key not in ("enum", "const") and isinstance(sub, (dict, list)):
                visit(sub, ptr + (key,))

    visit(schema, ())
