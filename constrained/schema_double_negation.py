"""`not` inside `not`: the inner complement kept unresolved until the outer one cancels it.

¬¬S = S. A `not` whose complement has no exact positive form (a `format`, an `items` that some
item fails...) can still be enforced exactly when it sits inside another `not`: negating the
outer operand turns the inner `{"not": S}` back into S. GeoJSON's `crs` does this (`not: {anyOf:
[{properties: {properties: {not: {... format: uri}}}}]}`).

The vetter first runs as before (an inner `not` it cannot complement refuses the schema: its
fallbacks, such as listing a bounded number grid, see the refusal). Only for a schema refused
over `not` does it run again with `defer=True`: a `not` that lies in the operand of an outer
`not` becomes the marker `{"not": S}` (a keyword no backend receives) without being complemented
(a complement that exists may still be one the outer `not` cannot complement again, such as a
long pattern); the outer negation of a marker is S. A marker still present in the vetted schema (it was not
under a negation after all: a `oneOf` branch, say, is used both as is and negated) refuses the
schema with the inner keyword's pointer, so nothing unenforced reaches the backend.
"""

from __future__ import annotations

from typing import Any

from .unique_paths import subschemas


class PendingNots:
    """Markers made in a deferring pass, by identity, with the refusal each stands for."""

    def __init__(self, defer: bool) -> None:
        self.defer = defer
        self.depth = 0  # how many `not` operands the vetter is inside
        self.reasons: dict[int, tuple[tuple[str, ...], str]] = {}
        self.markers: list[dict[str, Any]] = []  # kept alive: `reasons` is keyed by their ids

    def marker(self, operand: Any, ptr: tuple[str, ...]) -> dict[str, Any] | None:
        """The unresolved complement of `operand`, or None where it may not be deferred (first
        pass, or not inside an outer `not`)."""
        if not self.defer or self.depth == 0:
            return None
        out = {"not": operand}
        self.reasons[id(out)] = (ptr, "a `not` inside a `not` that the outer one does not cancel")
        self.markers.append(out)
        return out

    def surviving(self, schema: Any, defs: dict[str, Any]) -> tuple[tuple[str, ...], str] | None:
        """(pointer, reason) of a marker the vetted schema still reaches (from its root, through
        `#/$defs/...` references), or None when every one was cancelled by an outer negation;
        definitions it no longer reaches (a marker may sit there: the negation inlined them) are
        deleted from `defs`."""
        if not self.reasons:
            return None
        seen: set[int] = set()
        reached: set[str] = set()
        stack = [schema]
        while stack:
            node = stack.pop()
            if not isinstance(node, dict) or id(node) in seen:
                continue
            seen.add(id(node))
            if "not" in node:
                return self.reasons.get(id(node), ((), "an unresolved `not`"))
            stack += [v for key, v in subschemas(node) if key != "$defs"]
            ref = node.get("$ref")
            if isinstance(ref, str) and ref.startswith("#/$defs/"):
                reached.add(ref[len("#/$defs/"):])
                stack.append(defs.get(ref[len("#/$defs/"):]))
        for name in [n for n in defs if n not in reached]:
            del defs[name]
        return None
