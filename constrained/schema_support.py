"""What each grammar backend enforces of the JSON Schema vocabulary (schema.py vets against it).

Only keywords a backend is known, and tested in tests/constrained, to enforce are listed; the
rest of the vocabulary is rewritten in front of it (`REWRITTEN`: they come out as allOf/anyOf)
or refused.
"""

from __future__ import annotations

from dataclasses import dataclass

# The vocabulary of drafts 04 to 2020-12 that constrains instances (applicators + validation).
VALIDATION = frozenset({
    "type", "enum", "const", "multipleOf", "maximum", "exclusiveMaximum", "minimum",
    "exclusiveMinimum", "maxLength", "minLength", "pattern", "format", "maxItems", "minItems",
    "uniqueItems", "maxContains", "minContains", "maxProperties", "minProperties", "required",
    "dependentRequired", "dependencies", "allOf", "anyOf", "oneOf", "not", "if", "then", "else",
    "dependentSchemas", "prefixItems", "items", "additionalItems", "contains", "properties",
    "patternProperties", "additionalProperties", "propertyNames", "unevaluatedItems",
    "unevaluatedProperties", "$ref", "$dynamicRef", "$recursiveRef",
})
TYPES = frozenset({"null", "boolean", "object", "array", "number", "integer", "string"})

_CORE = frozenset({
    "type", "enum", "const", "properties", "required", "additionalProperties", "items",
    "prefixItems", "minItems", "maxItems", "minLength", "maxLength", "pattern", "format",
    "anyOf", "$ref",
})
_FORMATS_LLG = frozenset({"date-time", "time", "date", "duration", "email", "hostname", "ipv4",
                          "ipv6", "uuid", "uri", "uri-reference", "json-pointer", "uri-template",
                          "relative-json-pointer"})


@dataclass(frozen=True)
class Support:
    """What one backend enforces (keywords), and which format values it knows."""

    keywords: frozenset[str]
    formats: frozenset[str]
    recursion: bool  # recursive $ref (needs a context-free backend)
    max_bound: int | None = None  # largest min/max{Length,Items} worth unrolling into a DFA


SUPPORT: dict[str, Support] = {
    "llguidance": Support(
        _CORE | {"oneOf", "allOf", "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum",
                 "multipleOf", "minProperties", "maxProperties", "patternProperties"},
        _FORMATS_LLG, recursion=True),
    "xgrammar": Support(
        _CORE | {"minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "minProperties",
                 "maxProperties", "patternProperties", "allOf", "oneOf"},
        frozenset({"date-time", "time", "date", "duration", "email", "ipv4", "ipv6", "uuid",
                   "uri", "hostname"}), recursion=True),
    "outlines": Support(
        _CORE,
        # no "uri": outlines-core's URI regex needs ~7 min and 17 GB of token tables here
        frozenset({"date-time", "date", "time", "email", "uuid"}), recursion=False,
        max_bound=64),
}
# Rewritten keywords come out as allOf/anyOf; a backend without allOf gets them refused.
REWRITTEN = frozenset({"not", "if", "propertyNames", "oneOf", "dependentRequired", "dependencies", "dependentSchemas",
                        "uniqueItems"})
