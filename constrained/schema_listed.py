"""Vetting decisions that defer to the reference validator (`jsonschema`, schema_finite.py).

A listed node (enum/const next to other validation keywords) becomes the enum of the values the
validator accepts, and a node refused as a whole whose numbers are a small grid becomes the enum of
the grid points it accepts (schema_numeric.py). Both run the validator from the document's root,
so they apply only where the node reads as it does there (same base URI and draft). A part of
schema.py's vetter, which inherits it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .schema_finite import FiniteDecider, listed_values
from .schema_numeric import split_numbers
from .schema_refs import RefIndex, get
from .schema_support import VALIDATION


class ReferenceDecisions:
    """decide_listed / split_numbers of the vetter (schema._Vetter)."""

    root: Any
    index: RefIndex
    finite: FiniteDecider
    vet: Callable[[Any, tuple[str, ...]], Any]

    def decide_listed(self, node: dict[str, Any], ptr: tuple[str, ...]) -> Any:
        """A listed (enum/const) node next to other validation keywords becomes the enum of
        the values the reference validator accepts (schema_finite.py), where that is exact."""
        values = listed_values(node)
        if values is None or not any(k in VALIDATION for k in node if k not in ("enum", "const", "type")):
            return None
        if not self.same_document(ptr) or not self.finite.usable():
            return None
        try:
            return self.finite.decide(node, values)
        except Exception:  # a schema the reference validator cannot run (bad regex...): vet as usual
            return None

    def split_numbers(self, node: dict[str, Any], ptr: tuple[str, ...]) -> Any:
        """A node refused as a whole whose numbers are a small finite set (schema_numeric.py)."""
        if not self.same_document(ptr) or not self.finite.usable():
            return None
        base = self.index.base_of(ptr)
        return split_numbers(node, lambda n: self.raw_members(n, base), self.finite.decide,
                             lambda other: self.vet(other, ptr))

    def raw_members(self, node: Any, base: str, depth: int = 0) -> list[dict[str, Any]]:
        """`node` and what it conjoins before vetting: allOf members, `$ref` targets."""
        if not isinstance(node, dict) or depth > 8:
            return []
        out = [node]
        for m in node.get("allOf", ()) if isinstance(node.get("allOf"), list) else ():
            out += self.raw_members(m, base, depth + 1)
        target = self.index.resolve(node["$ref"], base) if isinstance(node.get("$ref"), str) else None
        if target is not None:
            out += self.raw_members(get(self.root, target), self.index.base_of(target), depth + 1)
        return out

    def resolve_raw(self, ref: str, base: str) -> tuple[Any, str] | None:
        """A `$ref` of the original document: (target, its base URI), or None if not in it."""
        ptr = self.index.resolve(ref, base)
        return None if ptr is None else (get(self.root, ptr), self.index.base_of(ptr))

    def same_document(self, ptr: tuple[str, ...]) -> bool:
        """The reference validator (run from the root) reads `ptr` as the specification does."""
        index = self.index
        return index.base_of(ptr) == index.base_of(()) and index.draft_at(ptr) == index.draft_at(())
