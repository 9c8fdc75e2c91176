"""`propertyNames` as `patternProperties` + `additionalProperties: false`, intersected.

Property names are strings, so a name schema made of one string constraint (a pattern, a
length range, const/enum, and what `not` of those rewrites to) is one regex R, which becomes
`{"patternProperties": {R: true}, "additionalProperties": false}` in an `allOf`: a name not
matching R is forbidden, whatever else the object allows. Anything else is refused.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .schema_negation import Unsupported, regex_char


def _literal(words: list[str]) -> str:
    return "^(?:" + "|".join("".join(regex_char(c) for c in w) for w in words) + ")$"


def name_regexes(schema: Any, deref: Callable[[str], Any], depth: int = 0) -> list[str] | None:
    """Regexes every name must match (all of them), or None when no name is allowed."""
    if schema is True or schema is False or depth > 16:
        if depth > 16:
            raise Unsupported("propertyNames", "a recursive name schema")
        return [] if schema else None
    out: list[str] = []
    for key, value in schema.items():
        if key == "type":
            names = [value] if isinstance(value, str) else value
            if "string" not in names:
                return None
        elif key == "pattern":
            out.append(value)
        elif key in ("minLength", "maxLength"):
            low, high = (value, "") if key == "minLength" else (0, value)
            out.append(f"^[\\s\\S]{{{low},{high}}}$")
        elif key in ("const", "enum"):
            words = [w for w in ([value] if key == "const" else value) if isinstance(w, str)]
            if not words:
                return None
            out.append(_literal(words))
        elif key == "$ref":
            sub = name_regexes(deref(value), deref, depth + 1)
            if sub is None:
                return None
            out += sub
        elif key == "allOf":
            for member in value:
                sub = name_regexes(member, deref, depth + 1)
                if sub is None:
                    return None
                out += sub
        elif key == "anyOf":
            alts = [name_regexes(m, deref, depth + 1) for m in value]
            alts = [a for a in alts if a is not None]
            if not alts:
                return None
            if any(len(a) > 1 for a in alts):
                raise Unsupported("propertyNames", "a union of name schemas with several constraints")
            if any(not a for a in alts):
                continue  # one branch allows every name
            out.append("|".join(f"(?:{a[0]})" for a in alts))
        else:
            raise Unsupported("propertyNames", f"{key!r} in a property-name schema")
    return out


def property_names(schema: Any, deref: Callable[[str], Any]) -> list[Any]:
    """Schemas to intersect with the object so that `propertyNames: schema` holds exactly."""
    regexes = name_regexes(schema, deref)
    if regexes is None:  # no name allowed: only the empty object (non-objects are unaffected)
        return [{"additionalProperties": False}]
    if len(regexes) > 1:  # backends need disjoint patternProperties, and regexes lack `&`
        raise Unsupported("propertyNames", "several constraints on property names at once")
    return [{"patternProperties": {rx: True}, "additionalProperties": False} for rx in regexes]
