"""The logic keywords of a schema node rewritten into keywords every backend enforces.

`not` and `oneOf` are worked out inside the node's other keywords (a complement only has to be
exact where the instance can still be), `if`/`then`/`else` becomes an anyOf of two allOfs, and
`dependentRequired`/`dependentSchemas`/`dependencies` anyOfs on the property's absence. A part of
schema.py's vetter, which inherits it: it vets subschemas and resolves references for these methods.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from .schema_disjoint import disjoint, first_overlap
from .schema_double_negation import PendingNots
from .schema_negation import Unsupported, negate
from .schema_refs import pointer_text
from .schema_relative import Relative

if TYPE_CHECKING:
    from .schema import CheckedSchema


class LogicKeywords:
    """not / oneOf / if-then-else / dependencies of the vetter (schema._Vetter)."""

    out: CheckedSchema
    defs: dict[str, Any]
    names: dict[tuple[str, ...], str]
    outer: list[Any]
    relative: Relative
    pending: PendingNots
    retry: list[tuple[dict[str, Any], list[Any], list[Any], tuple[str, str]]]
    vet: Callable[[Any, tuple[str, ...]], Any]
    deref: Callable[[str], Any]
    deref_or_any: Callable[[str], Any]
    expect: Callable[[bool, str, tuple[str, ...], str], None]

    def complement_keyword(self, key: str, value: Any, sub: tuple[str, ...], context: list[Any],
                           clean: dict[str, Any], extra: list[Any]) -> None:
        """`not` and `oneOf`, worked out inside `context` (the node's other keywords): a
        complement only has to be exact where the instance can still be."""
        if key == "not":
            self.pending.depth += 1
            try:
                schema = self.vet(value, sub)
            finally:
                self.pending.depth -= 1
            neg = self.pending.marker(schema, sub[:-1])  # inside another `not`, on the retry: cancelled there
            if neg is None:
                try:
                    neg = negate(schema, self.deref)
                except Unsupported as exc:
                    try:
                        neg = self.relative.negate_within(schema, context)
                    except Unsupported:
                        raise Unsupported("not", f"not needs {exc.reason}") from exc
            clean.setdefault("allOf", []).append(neg)
            return
        self.expect(isinstance(value, list) and value, key, sub, "a non-empty list")
        branches = [self.vet(v, sub + (str(i),)) for i, v in enumerate(value)]
        overlap = first_overlap(branches, self.deref_or_any)
        if overlap is None:  # pairwise disjoint: exactly one == at least one
            extra.append({"anyOf": branches})
            return
        try:  # exactly one: branch i minus every other branch, per instance type, in context
            extra.append(self.relative.exactly_one(branches, context))
            return
        except Unsupported as exc:
            reason = exc.reason
        try:  # the same with absolute complements (they differ in what they can express)
            extra.append({"anyOf": [self.exclusive(i, branches) for i in range(len(branches))]})
        except Unsupported:  # the backend may still prove it; if not, this says why
            clean["oneOf"] = branches
            where = (pointer_text(sub[:-1]) or "#", f"branches {overlap[0]} and {overlap[1]} are not provably "
                                                    f"disjoint and {reason}")
            self.out.unproven_one_of.append(where)
            if len(self.defs) < len(self.names):  # some reference was still being vetted: retry at the end
                self.retry.append((clean, branches, context, where))

    def retry_one_of(self) -> None:
        """oneOf nodes first met inside a recursive definition, proven again now that every
        definition they reach is complete (a reference still being vetted counted as `true`)."""
        for clean, branches, context, where in self.retry:
            try:
                rewritten = self.relative.exactly_one(branches, context)
            except Unsupported:
                continue
            del clean["oneOf"]
            clean.setdefault("allOf", []).append(rewritten)
            self.out.unproven_one_of.remove(where)

    def negate(self, schema: Any, keyword: str) -> Any:
        try:
            return negate(schema, self.deref)
        except Unsupported as exc:
            raise Unsupported(keyword, f"{keyword} needs {exc.reason}") from exc

    def exclusive(self, i: int, branches: list[Any]) -> Any:
        others = [negate(b, self.deref) for j, b in enumerate(branches)
                  if j != i and not disjoint(branches[i], b, self.deref_or_any)]
        return {"allOf": [branches[i], *others]} if others else branches[i]

    def if_then_else(self, node: dict[str, Any], sub: tuple[str, ...], extra: list[Any]) -> None:
        base = sub[:-1]
        then = self.vet(node.get("then", True), base + ("then",))
        other = self.vet(node.get("else", True), base + ("else",))
        if then is True and other is True:
            return
        cond = self.vet(node["if"], sub)
        extra.append({"anyOf": [{"allOf": [cond, then]}, {"allOf": [self.negate(cond, "if"), other]}]})

    def dependencies(self, key: str, value: Any, sub: tuple[str, ...], extra: list[Any]) -> None:
        self.expect(isinstance(value, dict), key, sub, "an object")
        for name, dep in value.items():
            absent = {"properties": {name: False}}  # `name` listed first: backends order properties
            if isinstance(dep, list):  # dependentRequired form
                if dep:
                    extra.append({"anyOf": [absent, {"required": [name, *dep]}]})
            else:
                self.outer = [{"type": "object", "required": [name]}]  # what the dependent schema meets
                extra.append({"anyOf": [absent, {"allOf": [{"required": [name]}, self.vet(dep, sub + (name,))]}]})
