"""Complements relative to what is already known, and `oneOf` as "exactly one branch".

`not S` often has no exact positive form on its own (the complement of `additionalProperties`
or `items` says "some member somewhere fails"), yet `A ∧ ¬S` does, for the context A that the
instance is already known to satisfy (the node's other keywords, the branch being kept):

- a keyword of S that A implies (the same `$ref`, an equal value, a type A already has) adds
  nothing to ¬S inside A; a keyword about another instance type holds vacuously there;
- inside a context whose key set is closed (`additionalProperties: false`, no patterns),
  `additionalProperties` / `patternProperties` of S concern only the finitely many keys A allows;
- a disjunct of ¬S that is disjoint from A is dropped; if S and A are disjoint, ¬S is `true`.

negate_within(S, ctx) returns S' with S' ∧ ctx ≡ ¬S ∧ ctx (ctx: a list of schemas, read as a
conjunction; dropping members only weakens it, which keeps that identity), or raises
Unsupported. exactly_one() enforces `oneOf` per instance type with these complements.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from .schema_disjoint import _KINDS, Memo, _canon, _kinds, _values, counts_disjoint, disjoint, rejects
from .schema_formats import FORMAT_WITHIN, formats_disjoint
from .schema_lark_numbers import small_modulus
from .schema_negation import Unsupported, negate_keyword, unnamed_key_present
from .schema_pattern_complement import pattern_matches, patterns_disjoint
from .schema_some_key import NOT_INTEGER, NOT_MULTIPLE, some_key

Deref = Callable[[str], Any]
TYPES = ("null", "boolean", "object", "array", "number", "string")
_MAX_DEPTH = 12
KIND_OF = {  # keyword -> the one instance type it constrains (others satisfy it vacuously)
    **dict.fromkeys(("minLength", "maxLength", "pattern", "format"), "string"),
    **dict.fromkeys(("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf"), "number"),
    **dict.fromkeys(("items", "prefixItems", "minItems", "maxItems", "uniqueItems", "contains"), "array"),
    **dict.fromkeys(("properties", "required", "additionalProperties", "patternProperties",
                     "minProperties", "maxProperties", "propertyNames"), "object"),
}
_COARSE = {"integer": "number", "fraction": "number"}


def members(schema: Any, deref: Deref, depth: int = 0) -> list[Any]:
    """`schema` and what it conjoins (allOf members, $ref targets), flattened. A recursive
    reference still being vetted counts as `true` (deref's job): a weaker context is sound."""
    if schema is True or depth > _MAX_DEPTH:
        return []
    if schema is False:
        return [False]
    out = [schema]
    for m in schema.get("allOf", ()):
        out += members(m, deref, depth + 1)
    if "$ref" in schema:
        out += members(deref(schema["$ref"]), deref, depth + 1)
    return out


def kinds(ms: list[Any]) -> set[str]:
    """Instance kinds (integer / fraction split) every member allows."""
    out = set().union(*_KINDS.values())
    for m in ms:
        out &= set() if m is False else _kinds(m)
    return out


def _types(ms: list[Any]) -> set[str]:
    return {_COARSE.get(k, k) for k in kinds(ms)}


def required(ms: list[Any]) -> set[str]:
    return {k for m in ms if isinstance(m, dict) for k in m.get("required", ()) if isinstance(k, str)}


def prop_schemas(ms: list[Any], key: str) -> list[Any]:
    """Every schema the members apply to property `key` (those we cannot decide are left out)."""
    out = []
    for m in ms:
        if not isinstance(m, dict):
            continue
        if key in m.get("properties", {}):
            out.append(m["properties"][key])
            continue
        matched, unknown = False, False
        for pattern, sub in m.get("patternProperties", {}).items():
            hit = pattern_matches(pattern, key)
            unknown |= hit is None
            if hit:
                matched = True
                out.append(sub)
        if not matched and not unknown and "additionalProperties" in m:
            out.append(m["additionalProperties"])
    return out


def closed_keys(ms: list[Any]) -> set[str] | None:
    """The only keys an instance may have, when some member closes its key set."""
    out: set[str] | None = None
    for m in ms:
        if isinstance(m, dict) and m.get("additionalProperties") is False and not m.get("patternProperties"):
            keys = set(m.get("properties", {}))
            out = keys if out is None else out & keys
    return out


def _implied(key: str, value: Any, node: dict[str, Any], ctx: list[Any]) -> bool:
    """The context guarantees `key: value` of `node` (so its complement is empty inside it)."""
    if KIND_OF.get(key) is not None and KIND_OF[key] not in _types(ctx):
        return True  # only instances of another type reach here: the keyword holds vacuously
    if key == "type":
        return kinds(ctx) <= _kinds({"type": value})
    if key == "required":
        return set(value) <= required(ctx)
    if key == "format" and any(isinstance(m, dict) and (m.get("format"), value) in FORMAT_WITHIN for m in ctx):
        return True  # every string of a context format has this one (an IPv4 address is a host name)
    text = _canon(value)
    same = [m for m in ctx if isinstance(m, dict) and key in m and _canon(m[key]) == text]
    if key == "additionalProperties":  # its meaning depends on the listed names and patterns
        return any(set(m.get("properties", {})) == set(node.get("properties", {}))
                   and _canon(m.get("patternProperties", {})) == _canon(node.get("patternProperties", {}))
                   for m in same)
    if key == "items":
        return any(_canon(m.get("prefixItems")) == _canon(node.get("prefixItems")) for m in same)
    return bool(same)


class Relative:
    """Disjointness proofs and relative complements over one document's vetted schemas
    (`#/$defs/rN`); pairs proven once are remembered."""

    def __init__(self, deref: Deref, strict: Deref, contains: bool = False) -> None:
        self.deref = deref    # for proofs: a reference still being vetted may read as `true`
        self.strict = strict  # for complements: such a reference raises Unsupported
        self.contains = contains  # "some item fails" may be written `contains` (schema_contains.py)
        self.memo: Memo = {}

    def _value_members(self, schemas: list[Any], depth: int) -> list[Any]:
        return [x for s in schemas for x in members(s, self.deref, depth + 1)]

    def conj_disjoint(self, ma: list[Any], mb: list[Any], depth: int = 0) -> bool:
        """True only when no instance satisfies every member of `ma` and every member of `mb`."""
        if False in ma or False in mb:
            return True
        common = kinds(ma) & kinds(mb)
        if not common:
            return True
        if depth > _MAX_DEPTH:
            return False
        for xs, ys in ((ma, mb), (mb, ma)):
            for m in xs:
                values = _values(m) if isinstance(m, dict) else None
                if values is not None and all(any(rejects(y, v, self.deref) for y in ys + xs) for v in values):
                    return True
        for kind in ("object", "array"):
            if common <= {kind} and counts_disjoint(ma, mb, kind):
                return True
        if common <= {"object"}:
            req_a, req_b = required(ma), required(mb)
            for key in req_a | req_b:  # present in any common instance: both sides' values apply
                if self.conj_disjoint(self._value_members(prop_schemas(ma, key), depth),
                                 self._value_members(prop_schemas(mb, key), depth), depth + 1):
                    return True
            for req, other in ((req_a, mb), (req_b, ma)):
                keys = closed_keys(other)
                if any(k not in keys for k in req) if keys is not None else False:
                    return True
                if any(False in prop_schemas(other, k) for k in req):
                    return True
        if common <= {"string"}:
            pa = [m["pattern"] for m in ma if isinstance(m.get("pattern"), str)]
            pb = [m["pattern"] for m in mb if isinstance(m.get("pattern"), str)]
            if any(patterns_disjoint(p, q) for p in pa for q in pb):
                return True
            fa = [m["format"] for m in ma if isinstance(m.get("format"), str)]
            fb = [m["format"] for m in mb if isinstance(m.get("format"), str)]
            if any(formats_disjoint(f, g) for f in fa for g in fb):
                return True
        return any(disjoint(x, y, self.deref, 0, self.memo) for x in ma for y in mb)

    def negate_within(self, schema: Any, ctx: list[Any], depth: int = 0) -> Any:
        """A schema S' with S' ∧ ctx ≡ ¬schema ∧ ctx (raises Unsupported when none is found)."""
        if schema is True:
            return False
        if schema is False or False in ctx:
            return True if schema is False else False
        if depth > _MAX_DEPTH:
            raise Unsupported("$ref", "the complement of a recursive schema")
        if self.conj_disjoint(members(schema, self.deref), ctx):
            return True
        listed = [v for v in (_values(m) for m in ctx if isinstance(m, dict)) if v is not None]
        if listed and set(schema) <= {"type", "enum", "const"}:  # `rejects` is exact on these
            return {"enum": [v for v in min(listed, key=len) if rejects(schema, v, self.deref)]}
        branches: list[Any] = []
        for key, value in schema.items():
            if _implied(key, value, schema, ctx):
                continue
            for b in self._negate_keyword_within(key, value, schema, ctx, depth):
                if b is True:
                    return True
                if b is not False and not self.conj_disjoint(members(b, self.deref), ctx):
                    branches.append(b)
        unique = list({json.dumps(b, sort_keys=True): b for b in branches}.values())
        if not unique:
            return False
        return unique[0] if len(unique) == 1 else {"anyOf": unique}

    def _negate_keyword_within(self, key: str, value: Any, node: dict[str, Any], ctx: list[Any],
                               depth: int) -> list[Any]:
        d = depth + 1
        if key == "type" and self.contains and _integer_only(value):  # non-integer numbers: a Lark terminal
            rest = [t for t in TYPES if t != "number" and t not in ([value] if isinstance(value, str) else value)]
            return ([{"type": rest}] if rest else []) + [{"type": "number", NOT_INTEGER: True}]
        if key == NOT_INTEGER:  # the numbers it rejects are the integers (others satisfy it vacuously)
            return [{"type": "integer"}]
        if key == "multipleOf" and self.contains and small_modulus(value):  # remainder rules on the route
            return [{"type": "number", NOT_MULTIPLE: [value]}]
        if key == NOT_MULTIPLE:  # the numbers it rejects: multiples of one of its moduli
            return [{"type": "number", "multipleOf": q} for q in value]
        if key == "properties":
            out = []
            for name, sub in value.items():
                inside = prop_schemas(ctx, name)
                keys = closed_keys(ctx)
                if False in inside or (keys is not None and name not in keys):
                    continue  # the context forbids the property: it never fails here
                neg = self.negate_within(sub, self._value_members(inside, d), d)
                if neg is not False:
                    out.append({"type": "object", "required": [name], "properties": {name: neg}})
            return out
        if key in ("additionalProperties", "patternProperties"):
            return self._negate_extra_keys(key, value, node, ctx, d)
        if key == "items" and not isinstance(value, list):
            inside = [m["items"] for m in ctx if isinstance(m, dict) and "items" in m and "prefixItems" not in m]
            allowed = self._value_members(inside, d)
            failing = self.negate_within(value, allowed, d)
            if failing is False:
                return []  # every item the context allows already satisfies `value`
            if allowed and self.conj_disjoint(members(value, self.deref), allowed):
                return [{"type": "array", "minItems": 1}]  # no allowed item satisfies `value`
            if self.contains:  # an item of the context's that fails `value`
                return [{"type": "array", "contains": failing}]
            raise Unsupported("items", "the complement of 'items' (some item fails) has no exact form here")
        if key == "contains" and self.contains:  # no item of the context's matches `value`
            inside = [m["items"] for m in ctx if isinstance(m, dict) and "items" in m and "prefixItems" not in m]
            failing = self.negate_within(value, self._value_members(inside, d), d)
            return [{"type": "array", "maxItems": 0} if failing is False else {"type": "array", "items": failing}]
        if key == "allOf":
            return [self.negate_within(m, ctx, d) for m in value]
        if key == "anyOf":
            return [{"allOf": [self.negate_within(m, ctx, d) for m in value]}]
        if key == "$ref":
            return [self.negate_within(self.strict(value), ctx, d)]
        return negate_keyword(key, value, self.strict, depth)

    def _negate_extra_keys(self, key: str, value: Any, node: dict[str, Any], ctx: list[Any],
                           depth: int) -> list[Any]:
        """¬additionalProperties / ¬patternProperties: some such key has a failing value. Exact only
        inside a context that allows finitely many keys: then it is a choice among those keys."""
        subs = [value] if key == "additionalProperties" else list(value.values())
        if all(s is True for s in subs):
            return []  # every value satisfies `true`: no key can fail
        keys = closed_keys(ctx)
        if keys is None and key == "additionalProperties" and value is False and not node.get("patternProperties"):
            counted = unnamed_key_present(node)  # "some unnamed key", by key counts
            if counted is not None:
                return counted
        if keys is None and self.contains:  # written as an object rule with one failing key (schema_some_key.py)
            names = list(node.get("properties", {}))
            if key == "additionalProperties":
                # context members whose additionalProperties reach every such key: no patterns, fewer names
                inside = [m["additionalProperties"] for m in ctx if isinstance(m, dict) and "additionalProperties" in m
                          and not m.get("patternProperties") and set(m.get("properties", {})) <= set(names)]
                tried = [([], list(node.get("patternProperties", {})), value, inside)]
            else:  # context members with the same pattern: their schema holds for every such key
                tried = [([p], [], sub, [m["patternProperties"][p] for m in ctx if isinstance(m, dict)
                                         and p in m.get("patternProperties", {})]) for p, sub in value.items()]
            return [some_key(names if key == "additionalProperties" else [], match, unmatch, failing)
                    for match, unmatch, sub, inside in tried
                    for failing in [self.negate_within(sub, self._value_members(inside, depth), depth)]
                    if failing is not False]
        if keys is None:
            raise Unsupported(key, f"the complement of {key!r} (some key's value fails) outside a closed key set")
        out = []
        for name in sorted(keys):
            if key == "additionalProperties":
                if name in node.get("properties", {}):
                    continue
                hits = [pattern_matches(p, name) for p in node.get("patternProperties", {})]
                if None in hits:
                    raise Unsupported(key, "a patternProperties regex we cannot decide")
                if any(hits):
                    continue
                subs = [value]
            else:
                hits = [(pattern_matches(p, name), s) for p, s in value.items()]
                if any(h is None for h, _ in hits):
                    raise Unsupported(key, "a patternProperties regex we cannot decide")
                subs = [s for h, s in hits if h]
            inside = self._value_members(prop_schemas(ctx, name), depth)
            for sub in subs:
                neg = self.negate_within(sub, inside, depth)
                if neg is not False:
                    out.append({"type": "object", "required": [name], "properties": {name: neg}})
        return out

    def exactly_one(self, branches: list[Any], context: list[Any]) -> Any:
        """`oneOf` as an `anyOf` whose branch i is B_i minus every B_j, worked out per instance type
        (inside the node's other keywords `context`); Unsupported when a complement has no form."""
        out: list[Any] = []
        for i, branch in enumerate(branches):
            own = members(branch, self.deref) + context
            free: list[str] = []
            guarded: list[Any] = []
            for t in TYPES:
                ctx = own + [{"type": t}]
                if not kinds(ctx):
                    continue
                negs: list[Any] = []
                for j, other in enumerate(branches):
                    if j == i or self.conj_disjoint(members(other, self.deref), ctx):
                        continue
                    neg = self.negate_within(other, ctx)
                    if neg is False:
                        break
                    if neg is not True:
                        negs.append(neg)
                else:
                    if negs:
                        guarded.append({"allOf": [{"type": t}, _factor(negs)]})
                    else:
                        free.append(t)
            if not free and not guarded:
                continue  # every instance of this branch matches another one too
            parts = ([{"type": free[0] if len(free) == 1 else free}] if free else []) + guarded
            if not guarded and set(free) >= _types(own):
                out.append(branch)
            else:
                out.append({"allOf": [branch, parts[0] if len(parts) == 1 else {"anyOf": parts}]})
        if not out:
            return False
        return out[0] if len(out) == 1 else {"anyOf": out}


def _integer_only(value: Any) -> bool:
    """`type` naming integer but not number (its complement holds the non-integer numbers)."""
    named = {value} if isinstance(value, str) else set(value) if isinstance(value, list) else set()
    return "integer" in named and "number" not in named


def _factor(negs: list[Any]) -> Any:
    """∧_j (d ∨ X_j) as d ∨ ∧_j X_j: a disjunct common to every complement is taken out, so the
    backend does not expand the product of the anyOfs."""
    options = [n["anyOf"] if isinstance(n, dict) and list(n) == ["anyOf"] else [n] for n in negs]
    keyed = [{json.dumps(d, sort_keys=True): d for d in opts} for opts in options]
    common = set(keyed[0]).intersection(*keyed[1:]) if len(keyed) > 1 else set()
    if not common:
        return negs[0] if len(negs) == 1 else {"allOf": negs}
    rest = [[d for k, d in opts.items() if k not in common] for opts in keyed]
    shared = [keyed[0][k] for k in sorted(common)]
    if all(rest):
        shared.append(_factor([r[0] if len(r) == 1 else {"anyOf": r} for r in rest]))
    return shared[0] if len(shared) == 1 else {"anyOf": shared}
