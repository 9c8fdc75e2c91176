"""Finite number sets: a schema whose numbers are bounded on both sides and lie on a grid.

`not: {multipleOf: 6}`, `oneOf` of multipleOf ranges and the like have no exact positive form
for an unbounded number line (the complement of a multipleOf is not a JSON Schema keyword), but
where the schema also bounds its numbers (minimum/maximum, exclusive or not) and puts them on a
grid (`type: integer`, multipleOf — several in a conjunction meet at their least common
multiple — or an anyOf/oneOf whose every branch has a grid), its numbers are a finite set. Each
grid point is then decided by the reference validator (schema_finite.FiniteDecider) and the
numbers become the `enum` of those that pass: exact, like listed values, up to the number's
spelling (each listed as its shortest JSON form: 105, not 105.0 or 1.05e2). The schema's other
instance types are vetted apart, with the number types taken out of `type`.

Grids and bounds are read from the node and what it conjoins (allOf members, `$ref` targets);
reading fewer of them only widens the candidate set, which the validator narrows again.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from fractions import Fraction
from typing import Any

MAX_NUMBERS = 2048  # grid points validated one by one (~20 µs each)
NON_NUMBER = ("null", "boolean", "object", "array", "string")
Members = Callable[[Any], list[dict[str, Any]]]


def _fraction(value: Any) -> Fraction | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return Fraction(repr(value)) if isinstance(value, float) else Fraction(value)


def _lcm(a: Fraction | None, b: Fraction | None) -> Fraction | None:
    """Least common multiple of two positive rationals (None: no grid)."""
    if a is None or b is None:
        return a if b is None else b
    return Fraction(math.lcm(a.numerator, b.numerator), math.gcd(a.denominator, b.denominator))


def _types(m: dict[str, Any]) -> set[str] | None:
    t = m.get("type")
    names = [t] if isinstance(t, str) else t if isinstance(t, list) else None
    return None if names is None else {n for n in names if isinstance(n, str)}


def _step(ms: list[dict[str, Any]]) -> Fraction | None:
    """The grid that every number of the conjunction `ms` lies on (None: none known)."""
    step: Fraction | None = None
    for m in ms:
        types = _types(m)
        if types is not None and "number" not in types and "integer" in types:
            step = _lcm(step, Fraction(1))
        mult = _fraction(m.get("multipleOf"))
        if mult is not None and mult > 0:
            step = _lcm(step, mult)
    return step


def _bounds(ms: list[dict[str, Any]]) -> tuple[Fraction | None, Fraction | None]:
    """Inclusive bounds every number meets (strictness is the validator's to apply)."""
    low: Fraction | None = None
    high: Fraction | None = None
    for m in ms:
        for key in ("minimum", "exclusiveMinimum"):
            v = _fraction(m.get(key))
            if v is not None and (low is None or v > low):
                low = v
        for key in ("maximum", "exclusiveMaximum"):
            v = _fraction(m.get(key))
            if v is not None and (high is None or v < high):
                high = v
    return low, high


def _points(step: Fraction, low: Fraction, high: Fraction) -> list[Fraction] | None:
    first, last = math.ceil(low / step), math.floor(high / step)
    if last - first + 1 > MAX_NUMBERS:
        return None
    return [k * step for k in range(first, last + 1)]


def finite_numbers(node: dict[str, Any], members: Members) -> list[int | float] | None:
    """A finite superset of the numbers `node` accepts, as JSON values; None when the numbers
    are not bounded on both sides and on a grid, or the set is over MAX_NUMBERS."""
    ms = members(node)
    types = [t for t in (_types(m) for m in ms) if t is not None]
    if any(not t & {"number", "integer"} for t in types):
        return None  # no number reaches here: nothing to list
    low, high = _bounds(ms)
    if low is None or high is None:
        return None
    if high < low:
        return []
    outer = _step(ms)
    options = [] if outer is None else [_points(outer, low, high)]
    for m in ms:
        for key in ("anyOf", "oneOf"):  # every number satisfies some branch
            branches = m.get(key)
            if not isinstance(branches, list) or not branches:
                continue
            steps = [_step(members(b)) if isinstance(b, dict) else None for b in branches]
            if any(s is None for s in steps):
                continue
            union: set[Fraction] = set()
            for s in steps:
                pts = _points(_lcm(outer, s), low, high)  # type: ignore[arg-type]
                if pts is None:
                    break
                union.update(pts)
            else:
                options.append(sorted(union))
    known = [o for o in options if o is not None]
    if not known:
        return None
    return [_json_number(v) for v in min(known, key=len)]


def _json_number(v: Fraction) -> int | float:
    return v.numerator if v.denominator == 1 else float(v)


def non_number_types(node: dict[str, Any], members: Members) -> list[str]:
    """The instance types other than numbers that `node` still admits (by `type` alone)."""
    allowed = set(NON_NUMBER)
    for m in members(node):
        types = _types(m)
        if types is not None:
            allowed &= types
    return [t for t in NON_NUMBER if t in allowed]


def split_numbers(node: dict[str, Any], members: Members, decide: Callable[[dict[str, Any], list[Any]], Any],
                  vet_other: Callable[[dict[str, Any]], Any]) -> Any:
    """`node` as (the enum of its numbers) ∪ (node over its other types), or None when its
    numbers are not a small finite set. `decide(node, values)` is the validator's enum;
    `vet_other(schema)` vets the non-number part (it may raise: the caller's refusal stands)."""
    values = finite_numbers(node, members)
    if values is None:
        return None
    numbers = decide(node, values)
    rest = non_number_types(node, members)
    if not rest:
        return numbers
    other = vet_other({**node, "type": rest if len(rest) > 1 else rest[0]})
    return {"anyOf": [numbers, other]} if numbers is not False else other
