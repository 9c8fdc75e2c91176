"""Deeply nested vetted schemas cut into `$defs`, under the backend's JSON nesting limit.

llguidance reads the schema with serde_json, which stops at 128 nested arrays/objects
("recursion limit exceeded"). Our rewrites nest: the complement of a 30-level `const` object is
about 190 levels deep (each level an `anyOf` of `properties` of the next). A subschema is the same
schema wherever it sits, so one that lies deeper than MAX_DEPTH is moved to `$defs` and referenced
(`{"$ref": "#/$defs/dN"}` alone, no sibling keywords for the backend to intersect): the language
is unchanged and no part of the document nests deeper than about MAX_DEPTH + a definition's own
depth, which is cut the same way.
"""

from __future__ import annotations

from typing import Any

MAX_DEPTH = 96  # JSON nesting levels; serde_json's limit is 128 and the grammar wrapper adds a few
_LISTS = ("allOf", "anyOf", "oneOf", "prefixItems")
_MAPS = ("properties", "patternProperties", "dependentSchemas")
_ONE = ("items", "additionalProperties", "not", "if", "then", "else", "contains", "propertyNames",
        "additionalItems", "unevaluatedItems", "unevaluatedProperties")


def _places(node: dict[str, Any]) -> list[tuple[Any, Any, int]]:
    """(container, index, extra depth) of every subschema of `node`, $defs left out."""
    out: list[tuple[Any, Any, int]] = []
    for key, value in node.items():
        if key in _LISTS and isinstance(value, list):
            out += [(value, i, 2) for i in range(len(value))]
        elif key in _MAPS and isinstance(value, dict):
            out += [(value, k, 2) for k in value]
        elif key in _ONE:
            out.append((node, key, 1))
    return out


def cut_deep_nesting(schema: Any, max_depth: int = MAX_DEPTH) -> int:
    """Moves, in place, every subschema nested deeper than `max_depth` into the root's `$defs`;
    returns how many moved."""
    if not isinstance(schema, dict):
        return 0
    defs: dict[str, Any] = schema.get("$defs", {})
    moved = 0
    stack: list[tuple[Any, int]] = [(schema, 1)] + [(d, 3) for d in defs.values()]
    seen: set[int] = set()  # a node shared by several places is cut where it is first met
    while stack:
        node, depth = stack.pop()
        if not isinstance(node, dict) or id(node) in seen:
            continue
        seen.add(id(node))
        for container, index, extra in _places(node):
            child = container[index]
            if depth + extra > max_depth and isinstance(child, dict) and set(child) != {"$ref"}:
                name = f"d{moved}"
                while name in defs:
                    name += "_"
                defs[name] = child
                container[index] = {"$ref": f"#/$defs/{name}"}
                moved += 1
                stack.append((child, 3))
            else:
                stack.append((child, depth + extra))
    if moved:
        schema["$defs"] = defs
    return moved
