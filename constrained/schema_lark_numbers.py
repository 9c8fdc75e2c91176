"""Numbers on the Lark route: "not an integer" and "not a multiple of m" as terminals and rules.

Complements of `type: integer` and of `multipleOf` have no JSON-Schema form, so schema_relative
(Modes.contains) writes them as private keywords (schema_some_key.NOT_INTEGER / NOT_MULTIPLE) and
schema_contains hands a node holding one to number_rule(). For an integer modulus the integers
with a given remainder mod M are a regular language over their decimal digits (a DFA of
remainders), written as right-linear rules with one lexeme a digit; bounds beside them are met
exactly by value states for magnitudes below 10^D (10^D past every bound), remainder states past
them on the side with no bound, minimised. Non-integers (a multiple of no integer) are cov18's
fraction terminal, or the same numbers as digit rules in a grammar that holds digit rules
(llguidance lexes greedily: a terminal beside one-digit lexemes would cut integers off), there
with integer bounds met on the integer part. Integers carry no fraction, no exponent and no `-0`
(stricter, never looser); Python's json reads them exactly, so `jsonschema` decides `multipleOf`
on them exactly. Anything else (a decimal modulus, M over 64, bounds of 1,000 or more, a bound
that is no integer beside non-integers, other keywords) is refused.
"""

from __future__ import annotations

import math
from typing import Any

from .schema_lark_object import Empty, live_states
from .schema_negation import Unsupported
from .schema_number_gap import gap_terminal
from .schema_some_key import NOT_INTEGER, NOT_MULTIPLE
from .schema_support import VALIDATION

MAX_MODULUS = 64  # remainders tracked as grammar states
_MAX_DIGITS = 3   # bounds below 10^3: values up to that size are states (minimised)
# Numbers that are no integer under any draft and in any reader: a fraction with a nonzero digit, no
# exponent, at most 15 significant digits (a double recovers such a decimal exactly, so it never
# reads as an integer). Stricter than "not an integer" (no 1.5e0), never looser. By sign: a bound
# of 0 beside it picks the negative or the positive ones.
_UNSIGNED = "(?:" + "|".join(
    ["0\\.[0-9]{0,13}[1-9]"] + [f"[1-9][0-9]{{{k}}}\\.[0-9]{{0,{13 - k}}}[1-9]" for k in range(14)]) + ")"
NOT_INTEGER_TERMINALS = {"FRACTION": f"/-?{_UNSIGNED}/", "FRACTION_NEG": f"/-{_UNSIGNED}/",
                         "FRACTION_POS": f"/{_UNSIGNED}/"}
_BELOW, _ABOVE = ("maximum", "exclusiveMaximum"), ("minimum", "exclusiveMinimum")
_NUMBER_KEYS = frozenset({"type", "multipleOf", *_BELOW, *_ABOVE})
_TYPES = ("null", "boolean", "object", "array", "number", "string")


def small_modulus(value: Any) -> bool:
    """A `multipleOf` whose complement the route writes: an integer from 1 to MAX_MODULUS."""
    return isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= MAX_MODULUS


def number_rule(route: Any, node: dict[str, Any]) -> str:
    """The rule for a node holding NOT_INTEGER / NOT_MULTIPLE: its numbers as terminals and rules,
    its other types as a JSON leaf. `route` is the ContainsGrammar being written."""
    extra = [k for k in node if k in VALIDATION and k not in _NUMBER_KEYS]
    if extra:
        raise Unsupported("multipleOf", f"a non-multiple or non-integer number next to {sorted(extra)}")
    types = node.get("type", list(_TYPES))
    types = [types] if isinstance(types, str) else types
    if not isinstance(types, list) or not all(isinstance(t, str) for t in types):
        raise Unsupported("contains", "unknown type on the path to contains")
    positive = node.get("multipleOf")
    if positive is not None and not small_modulus(positive):
        raise Unsupported("multipleOf", "a multipleOf other than an integer up to 64 beside a non-multiple")
    moduli = [positive] if positive is not None else []
    negative = node.get(NOT_MULTIPLE, [])
    if not all(small_modulus(q) for q in negative):
        raise Unsupported("multipleOf", "the complement of a multipleOf other than an integer up to 64")
    bounds = {k: node[k] for k in (*_BELOW, *_ABOVE) if k in node}
    if any(isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) for v in bounds.values()):
        raise Unsupported("minimum", "a bound that is not a finite number beside a non-multiple")
    others = [t for t in types if t not in ("number", "integer")]
    alts = [route._json_leaf({"type": others})] if others else []  # the numeric keywords hold for them vacuously
    numbers = "number" in types
    if (numbers or "integer" in types) and NOT_INTEGER not in node:
        alts += _integers(route, moduli, negative, bounds)
    if numbers and positive is None:  # a non-integer is no multiple of an integer
        alts += _fractions(route, bounds)
    if not alts:
        raise Empty("contains", "no instance type left")
    return route._new(" | ".join(alts))


def _fractions(route: Any, bounds: dict[str, Any]) -> list[str]:
    """cov18's terminal (bounds of 0 only: they pick a sign), or, in a grammar with digit rules
    (route.split), the same numbers as digit rules, since llguidance lexes greedily and a terminal
    beside them would cut integers off (`12` read as the start of `12.5`); there integer bounds are
    met exactly on the integer part (a non-integer x > 0 has x >= L iff its integer part is >= L)."""
    gap = gap_terminal(bounds)  # bounds that are no integer, within one [n, n + 1]
    if gap is not None:
        if route.split:  # a terminal beside one-digit lexemes would cut integers off
            raise Unsupported("type", "a non-integer number next to a bound that is no integer")
        if not gap:
            return []
        name = route.gap_terminals.setdefault(gap, f"GAP{len(route.gap_terminals)}")
        return [name]
    if route.split:
        return _fraction_rules(route, bounds)
    if any(v != 0 for v in bounds.values()):  # left to the digit-rule pass (refused where it fails)
        route.numbers += 1
        route.deferred = True
        return []
    below, above = set(bounds) & set(_BELOW), set(bounds) & set(_ABOVE)
    if below and above:  # only 0, an integer
        return []
    name = "FRACTION_NEG" if below else "FRACTION_POS" if above else "FRACTION"
    route.fractions.add(name)
    return [name]


def _fraction_rules(route: Any, bounds: dict[str, Any]) -> list[str]:
    if any(not float(v).is_integer() for v in bounds.values()):
        raise Unsupported("type", "a non-integer number next to a bound that is no integer")
    lows = [int(v) for k, v in bounds.items() if k in _ABOVE]
    highs = [int(v) for k, v in bounds.items() if k in _BELOW]
    low, high = (max(lows) if lows else None), (min(highs) if highs else None)
    alts = []
    # integer parts allowed: positive numbers I + f, negative ones -(I + f), 0 < f < 1
    for sign, first, last in (("", low if low is not None and low >= 1 else 0, None if high is None else high - 1),
                              ('"-" ', -high if high is not None and high <= -1 else 0, None if low is None else -low - 1)):
        if last is None or last >= first:
            alts.append(route._new(sign + _fraction_digits(route, first, last)))
    return alts


def _fraction_digits(route: Any, first: int, last: int | None) -> str:
    """Unsigned non-integers whose integer part lies in [first, last] (last None: no end), as
    rules: integer digits one lexeme each (k of them, k <= 14), then one lexeme for the point and
    at most 14 - k more digits, the last nonzero (cov18's terminal's numbers)."""
    key = (first, last)
    if key in route.fraction_rules:
        return route.fraction_rules[key]
    widest = max(first, last or 0)
    digits = len(str(widest)) if widest else 0
    if digits > _MAX_DIGITS:
        raise Unsupported("minimum", f"a bound of {10 ** _MAX_DIGITS} or more beside a non-integer")
    span = 10 ** digits

    def step(state: tuple[str, int], d: int) -> tuple[str, int] | None:
        if state[0] == "v":
            value = state[1] * 10 + d
            return ("v", value) if value < span else ("k", digits + 1)
        return ("k", state[1] + 1) if state[1] < 14 else None

    def label(state: tuple[str, int]) -> int | None:  # integer digits read, where the point may follow
        if state[0] == "k":
            return state[1] if last is None else None
        return len(str(state[1])) if first <= state[1] and (last is None or state[1] <= last) else None

    moves: dict[Any, list[tuple[int, Any]]] = {}
    todo = [t for t in (step(("v", 0), d) for d in range(1, 10)) if t is not None]
    while todo:
        state = todo.pop()
        if state not in moves:
            moves[state] = [(d, t) for d in range(10) for t in [step(state, d)] if t is not None]
            todo += [t for _, t in moves[state]]
    live = live_states(moves, lambda s: label(s) is not None)
    block = _minimal(moves, live, label)
    route.numbers += 1
    names = {b: f"f{route.numbers}_{b}" for b in set(block.values())}

    def point(k: int) -> str:
        return f"/\\.[0-9]{{0,{14 - k}}}[1-9]/"

    def edges(pairs: list[tuple[int, Any]]) -> list[str]:
        by_target: dict[int, list[int]] = {}
        for d, t in pairs:
            if t in live:
                by_target.setdefault(block[t], []).append(d)
        return [f"/[{''.join(str(d) for d in ds)}]/ {names[b]}" for b, ds in sorted(by_target.items())]

    for b in sorted(names):
        state = min(s for s in live if block[s] == b)
        k = label(state)
        route.rules.append(f"{names[b]}: " + " | ".join(edges(moves[state]) + ([point(k)] if k is not None else [])))
    alts = ([f'"0" {point(1)}'] if first <= 0 else []) + edges([(d, step(("v", 0), d)) for d in range(1, 10)])
    if not alts:
        raise Empty("contains", "no non-integer in the bounds")
    route.fraction_rules[key] = route._new(" | ".join(alts))
    return route.fraction_rules[key]


def _integer_range(bounds: dict[str, Any]) -> tuple[int | None, int | None]:
    low = high = None
    for key, value in bounds.items():
        if key == "minimum":
            edge = math.ceil(value)
        elif key == "exclusiveMinimum":
            edge = math.floor(value) + 1
        elif key == "maximum":
            edge = math.floor(value)
        else:
            edge = math.ceil(value) - 1
        if key in _ABOVE:
            low = edge if low is None else max(low, edge)
        else:
            high = edge if high is None else min(high, edge)
    return low, high


def _integers(route: Any, moduli: list[int], negative: list[int], bounds: dict[str, Any]) -> list[str]:
    """Alternatives for the integers in the bounds that are multiples of every `moduli` and of no
    `negative` one, as digit rules: up to D digits the value read so far, past that its remainder."""
    modulus = math.lcm(*moduli, *negative) if moduli or negative else 1
    if modulus > MAX_MODULUS:
        raise Unsupported("multipleOf", f"remainders modulo {modulus} (more than {MAX_MODULUS} states)")
    kept = {r for r in range(modulus) if all(r % p == 0 for p in moduli) and all(r % q for q in negative)}
    low, high = _integer_range(bounds)
    widest = max([abs(v) for v in (low, high) if v is not None], default=0)
    digits = len(str(widest)) if widest else 0  # every bound lies below 10^digits in magnitude

    def allowed(x: int) -> bool:
        return x % modulus in kept and (low is None or x >= low) and (high is None or x <= high)

    if digits > _MAX_DIGITS:
        raise Unsupported("minimum", f"a bound of {10 ** _MAX_DIGITS} or more beside a non-multiple")
    alts = ['"0"'] if allowed(0) else []
    for sign, unbounded in ((1, high is None), (-1, low is None)):
        alts += _digits(route, modulus, digits, lambda v, s=sign: allowed(s * v),  # type: ignore[misc]
                        {r for r in range(modulus) if sign * r % modulus in kept} if unbounded else set(),
                        "" if sign == 1 else '"-" ')
    return alts


def _digits(route: Any, modulus: int, digits: int, short: Any, kept: set[int], sign: str) -> list[str]:
    """Digit strings without a leading zero: states ("v", value) for up to `digits` digits (accepted
    where short(value)), then ("r", value mod modulus) (accepted where the remainder is in `kept`).
    Every lexeme is one digit, so no lexeme is a prefix of another (llguidance lexes greedily)."""
    span = 10 ** digits

    def step(state: tuple[str, int], d: int) -> tuple[str, int]:
        value = state[1] * 10 + d
        return ("v", value) if state[0] == "v" and value < span else ("r", value % modulus)

    def accepting(state: tuple[str, int]) -> bool:
        return short(state[1]) if state[0] == "v" else state[1] in kept

    moves: dict[tuple[str, int], list[tuple[int, tuple[str, int]]]] = {}
    todo = [step(("v", 0), d) for d in range(1, 10)]
    while todo:
        state = todo.pop()
        if state not in moves:
            moves[state] = [(d, step(state, d)) for d in range(10)]
            todo += [t for _, t in moves[state]]
    live = live_states(moves, accepting)
    first = [(d, step(("v", 0), d)) for d in range(1, 10)]
    if not any(t in live for _, t in first):
        return []
    block = _minimal(moves, live, accepting)
    route.numbers += 1
    blocks = sorted(set(block.values()))
    if len(route.rules) + len(blocks) >= route.max_rules:
        raise Unsupported("contains", "too many rules")
    names = {b: f"n{route.numbers}_{b}" for b in blocks}

    def edges(pairs: list[tuple[int, tuple[str, int]]]) -> list[str]:
        by_target: dict[int, list[int]] = {}
        for d, t in pairs:
            if t in live:
                by_target.setdefault(block[t], []).append(d)
        return [f"/[{''.join(str(d) for d in ds)}]/ {names[b]}" for b, ds in sorted(by_target.items())]

    for b in blocks:
        state = min(s for s in live if block[s] == b)
        route.rules.append(f"{names[b]}: " + " | ".join(edges(moves[state]) + (['""'] if accepting(state) else [])))
    return [route._new(sign + "(" + " | ".join(edges(first)) + ")")]


def _minimal(moves: dict[Any, list[tuple[int, Any]]], live: set[Any], label: Any) -> dict[Any, int]:
    """Moore's partition refinement of the live states by their label (accepting, or what may
    follow): equivalent states share a block (so value states below a bound of 1,000 cost about
    digits x modulus rules, not 1,000)."""
    first = {s: label(s) for s in live}
    kinds = {v: i for i, v in enumerate(sorted(set(first.values()), key=repr))}
    block = {s: kinds[first[s]] for s in live}
    while True:
        signature = {s: (block[s], tuple(block.get(t, -1) for _, t in moves[s])) for s in live}
        ids = {sig: i for i, sig in enumerate(sorted(set(signature.values())))}
        refined = {s: ids[signature[s]] for s in live}
        if len(ids) == len(set(block.values())):
            return refined
        block = refined
