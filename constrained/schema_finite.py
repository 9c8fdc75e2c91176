"""Schemas with a finite instance set, decided value by value by a reference validator.

A schema object whose conjunction holds an `enum` or `const` (on itself or on a direct `allOf`
member) accepts at most those values. Whatever else it says (`not`, `oneOf`, `uniqueItems`,
`contains`, `if`...) can then be decided exactly by validating each listed value with
`jsonschema`, the schema's own draft, against the whole document (for `$ref`), and the schema
becomes the `enum` of the values that pass. Used only where that validator's answer is the
specification's: the node shares the document's base URI and draft, and every standard `format`
in the document has a checker installed (an unchecked format would pass anything).
"""

from __future__ import annotations

from typing import Any

from .schema_formats import STANDARD_FORMATS

Pointer = tuple[str, ...]


def listed_values(node: dict[str, Any]) -> list[Any] | None:
    """The values a schema object can accept at most (enum/const on it or a direct allOf
    member), or None when its instance set is not listed."""
    lists = []
    for part in [node, *[m for m in node.get("allOf", ()) if isinstance(m, dict)]]:
        if "const" in part:
            lists.append([part["const"]])
        elif isinstance(part.get("enum"), list):
            lists.append(part["enum"])
    return min(lists, key=len) if lists else None


def _formats(node: Any, out: set[str]) -> set[str]:
    if isinstance(node, dict):
        fmt = node.get("format")
        if isinstance(fmt, str):
            out.add(fmt)
        for value in node.values():
            _formats(value, out)
    elif isinstance(node, list):
        for value in node:
            _formats(value, out)
    return out


class FiniteDecider:
    """Validates listed values against subschemas of one document (built lazily)."""

    def __init__(self, root: Any) -> None:
        self.root = root
        self._validator: Any = None
        self._usable: bool | None = None

    def usable(self) -> bool:
        if self._usable is None:
            import jsonschema

            cls = jsonschema.validators.validator_for(self.root, default=jsonschema.Draft202012Validator)
            checker = cls.FORMAT_CHECKER
            unchecked = (_formats(self.root, set()) & STANDARD_FORMATS) - set(checker.checkers)
            self._usable = not unchecked
            if self._usable:
                self._validator = cls(self.root, format_checker=checker)
        return self._usable

    def decide(self, node: dict[str, Any], values: list[Any]) -> Any:
        """The `enum` of the listed values `node` accepts (`false` when none does)."""
        check = self._validator.evolve(schema=node)
        kept = [v for v in values if check.is_valid(v)]
        return {"enum": kept} if kept else False
