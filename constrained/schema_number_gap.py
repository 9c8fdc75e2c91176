"""Non-integers of one unit interval within non-integer bounds, as one Lark terminal.

A range that holds no integer (`{"exclusiveMinimum": 0, "maximum": 0.5}`) is the numbers n + f
(or -(n + f)), one integer part n, with the fraction digits f between the bounds' own fraction
digits. Those compare digit by digit, so the language is regular and small: one path per bound
along its digits, free digits once off both. Numbers carry at most 15 digits written (`0.` and
14 after the point; as schema_lark_numbers' fraction terminal), no trailing zero: a double recovers such a decimal exactly and keeps the
order of two of them, so `jsonschema`'s float comparison agrees with the digits (stricter, never
looser); a bound of more than 15 significant digits is refused. schema_integer_gap hands these
ranges here, since llguidance's own number ranges take the excluded integer on them.
"""

from __future__ import annotations

import math
from decimal import Decimal
from typing import Any

from .schema_negation import Unsupported

_SIGNIFICANT = 15
Edge = tuple[str, bool] | None  # a bound's fraction digits (trailing zeros cut), exclusive; None: no bound


def _edge(value: Any) -> Decimal:
    text = repr(value) if isinstance(value, float) else str(value)
    exact = Decimal(text)
    if len(exact.normalize().as_tuple().digits) > _SIGNIFICANT:
        raise Unsupported("minimum", f"a bound of more than {_SIGNIFICANT} significant digits beside a non-integer")
    return exact


def _tightest(bounds: dict[str, Any], keys: tuple[str, str], lower: bool) -> tuple[Decimal, bool] | None:
    best = None
    for key in keys:
        if key in bounds:
            v, excl = _edge(bounds[key]), key.startswith("exclusive")
            if best is None or (v > best[0]) == lower and v != best[0] or v == best[0] and excl:
                best = (v, excl)
    return best


def _digits(fraction: Decimal) -> str:
    """The fraction digits of 0 <= fraction < 1, trailing zeros cut."""
    text = format(fraction, "f")
    return text.split(".")[1].rstrip("0") if "." in text else ""


def unit_interval(bounds: dict[str, Any]) -> tuple[str, int, Edge, Edge] | None:
    """(sign, integer part, lower and upper edges on the fraction) where the bounds lie in one
    [n, n + 1] with a bound no integer (else None: other routes take them)."""
    if all(float(v).is_integer() for v in bounds.values()):
        return None
    low = _tightest(bounds, ("minimum", "exclusiveMinimum"), True)
    high = _tightest(bounds, ("maximum", "exclusiveMaximum"), False)
    if low is None or high is None:
        return None
    n = math.floor(low[0])
    if high[0] > n + 1:
        return None
    if n >= 0:  # n + f, f from low - n up to high - n
        lo, hi = (_digits(low[0] - n), low[1]), (None if high[0] == n + 1 else (_digits(high[0] - n), high[1]))
        return "", n, lo, hi
    m = -(n + 1)  # -(m + f): f from -high - m up to -low - m
    lo = (_digits(-high[0] - m), high[1])
    hi = None if low[0] == n else (_digits(-low[0] - m), low[1])
    return "-", m, lo, hi


def gap_terminal(bounds: dict[str, Any]) -> str | None:
    """A Lark regex terminal for the non-integers within `bounds` where unit_interval holds;
    "" where none lies there, None where unit_interval does not hold."""
    shape = unit_interval(bounds)
    if shape is None:
        return None
    sign, whole, lo, hi = shape
    room = _SIGNIFICANT - (len(str(whole)) if whole else 1)
    memo: dict[tuple[int, bool, bool, bool], str | None] = {}

    def tail(i: int, tl: bool, th: bool, can_end: bool) -> str | None:
        """Digits from position i on; tl / th: equal so far to the lower / upper edge's digits."""
        key = (i, tl, th, can_end)
        if key in memo:
            return memo[key]
        end = can_end and (not tl or (len(lo[0]) <= i and not lo[1])) and \
            (not th or hi is None or len(hi[0]) > i or not hi[1])
        if not tl and not th:
            r = room - i
            body = None if r <= 0 else f"[0-9]{{0,{r - 1}}}[1-9]"
            out = ("" if end else None) if body is None else (f"(?:{body})?" if end else body)
            memo[key] = out
            return out
        alts = [""] if end else []
        if i < room:
            groups: dict[tuple[bool, bool, bool], list[int]] = {}
            for d in range(10):
                a = int(lo[0][i]) if tl and i < len(lo[0]) else 0
                b = (int(hi[0][i]) if i < len(hi[0]) else 0) if th and hi is not None else 9
                if (tl and d < a) or (th and hi is not None and d > b):
                    continue
                state = (tl and d == a, th and hi is not None and d == b, d != 0)
                groups.setdefault(state, []).append(d)
            for (ntl, nth, nz), ds in sorted(groups.items()):
                rest = tail(i + 1, ntl, nth, nz)
                if rest is not None:
                    alts.append(f"[{''.join(map(str, ds))}]{rest}")
        out = None if not alts else alts[0] if len(alts) == 1 else "(?:" + "|".join(alts) + ")"
        memo[key] = out
        return out

    body = tail(0, True, hi is not None, False)
    if body is None:
        return ""
    return f"/{'-' if sign else ''}{whole}\\.{body}/"
