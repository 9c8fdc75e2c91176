"""Our own pass over a JSON schema before any backend sees it: vet, resolve, rewrite.

The rule (JSON Schema 2020-12 §6.5 and every earlier draft): keywords outside the vocabulary
are annotations and are ignored (`x-...`, draft-04 `id` in later drafts, typos, `readonly`...).
Each validation keyword of the vocabulary is enforced exactly, by the backend (only keywords it
is known, and tested in tests/constrained, to enforce) or by our rewriting into keywords it does
enforce (`not`, `if`/`then`/`else`, `dependentRequired`/`dependencies`, small `uniqueItems`
(larger ones are checked beside the grammar: unique_paths.py, unique_check.py),
draft-04 bounds and tuples, formats as patterns), or the schema is refused with
UnsupportedSchemaError naming keyword and JSON pointer. `lenient=True` drops refused keywords.
Every `$ref` is resolved here (base URIs, anchors, pointers) and handed on as `#/$defs/rN`.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

from .errors import GrammarCompileError, UnsupportedSchemaError
from .schema_anchors import without_inner_anchors
from .schema_any_order import free_optional_order, lead_with_schema_key
from .schema_depth import cut_deep_nesting
from .schema_double_negation import PendingNots
from .schema_escapes import ecma_escapes
from .schema_finite import FiniteDecider
from .schema_formats import FORMAT_PATTERNS, STANDARD_FORMATS
from .schema_if_chains import split_if_chain
from .schema_integer_gap import mark_integer_gaps
from .schema_listed import ReferenceDecisions
from .schema_logic import LogicKeywords
from .schema_negation import Unsupported
from .schema_property_names import property_names
from .schema_refs import RefIndex, get, has_recursion, pointer_text, same_instance_cycle
from .schema_relative import Relative, members
from .schema_simplify import simplify
from .schema_support import REWRITTEN, SUPPORT, TYPES, VALIDATION
from .schema_unevaluated import unevaluated_properties
from .schema_unique import closed_count, open_count, unique_items
from .unique_keys import check_paths, counts_keys
from .unique_paths import NO_UNIQUE_ARRAYS, UniquePaths, has_unique, strip_unique


@dataclass
class CheckedSchema:
    schema: dict[str, Any] | bool  # vetted copy: only keywords the backend enforces
    canonical: str                 # cache-key text of the *original* schema
    recursive: bool = False
    dropped: list[str] = field(default_factory=list)  # "path: keyword" dropped under lenient
    unproven_one_of: list[tuple[str, str]] = field(default_factory=list)  # (pointer, why) left to the backend
    unique: UniquePaths | None = None  # where open-set uniqueItems are checked beside the grammar


# SGLang's json_schema value for "any JSON document" (no schema to follow); the `true` schema here.
ANY_JSON = "$$ANY$$"


def _pattern(p: Any) -> Any:
    """A pattern (or pattern-property key) in the form the backend reads with ECMA's meaning."""
    return without_inner_anchors(ecma_escapes(p))


def parse_schema(spec: str | dict[str, Any] | bool) -> dict[str, Any] | bool:
    """JSON text or dict -> dict, with the JSON error position on bad text."""
    if isinstance(spec, (dict, bool)):
        return spec
    if spec == ANY_JSON:
        return True
    try:
        parsed = json.loads(spec)
    except json.JSONDecodeError as exc:
        raise GrammarCompileError(f"json_schema is not valid JSON: {exc.msg} at line {exc.lineno} "
                                  f"column {exc.colno} (char {exc.pos})") from exc
    if not isinstance(parsed, (dict, bool)):
        raise GrammarCompileError("json_schema must be a JSON object or boolean")
    return parsed


class _Vetter(LogicKeywords, ReferenceDecisions):
    def __init__(self, root: Any, backend: str, lenient: bool, out: CheckedSchema, modes: Modes) -> None:
        self.root, self.backend, self.lenient, self.out = root, backend, lenient, out
        self.split_chains = modes.split_chains  # if/then chains on one tag as one case split (schema_if_chains.py)
        self.unique_beside = modes.unique_beside and backend == "llguidance"
        self.support = SUPPORT[backend]
        self.index = RefIndex(root)
        self.finite = FiniteDecider(root)
        self.defs: dict[str, Any] = {}
        self.names: dict[tuple[str, ...], str] = {}
        self.outer: list[Any] = []
        self.contains = modes.contains and backend == "llguidance"  # kept for schema_contains.py's Lark
        self.relative = Relative(self.deref_or_any, self.deref, self.contains)
        self.retry: list[tuple[dict[str, Any], list[Any], list[Any], tuple[str, str]]] = []
        self.pending = PendingNots(modes.defer_not)

    def refuse(self, key: str, ptr: tuple[str, ...], reason: str) -> None:
        if not self.lenient:
            raise UnsupportedSchemaError(key, pointer_text(ptr), reason)
        self.out.dropped.append(f"{pointer_text(ptr) or '#'}: {key}")

    def deref(self, ref: str) -> Any:
        target = self.defs.get(ref.rsplit("/", 1)[-1])
        if target is None:  # still being vetted: the reference is recursive
            raise Unsupported("$ref", "the complement of a recursive schema")
        return target

    def deref_or_any(self, ref: str) -> Any:
        """For proofs: a reference still being vetted (recursive) counts as `true`."""
        target = self.defs.get(ref.rsplit("/", 1)[-1])
        return True if target is None else target

    def ref(self, value: Any, ptr: tuple[str, ...]) -> str | None:
        if not isinstance(value, str):
            raise GrammarCompileError(f"$ref at {pointer_text(ptr) or '#'} must be a string")
        target = self.index.resolve(value, self.index.base_of(ptr))
        if target is None:
            self.refuse("$ref", ptr, f"{value!r} is not a schema inside this document (remote or missing)")
            return None
        name = self.names.get(target)
        if name is None:
            name = self.names[target] = f"r{len(self.names)}"
            self.defs[name] = self.vet(get(self.root, target), target)
        return f"#/$defs/{name}"

    def vet(self, node: Any, ptr: tuple[str, ...]) -> Any:
        outer, self.outer = self.outer, []  # what the caller knows holds here (dependencies)
        if isinstance(node, bool):
            return node
        if not isinstance(node, dict):
            raise GrammarCompileError(f"schema at {pointer_text(ptr) or '#'} must be an object or boolean")
        if "$ref" not in node or self.index.draft_at(ptr) > 7:  # drafts 04-07: keywords next to $ref are ignored
            decided = self.decide_listed(node, ptr)
            if decided is not None:
                return decided
        if "$ref" in node and self.index.draft_at(ptr) <= 7:  # drafts 04-07: keywords next to $ref are ignored
            ref = self.ref(node["$ref"], ptr)
            return {"$ref": ref} if ref else {}
        saved = (len(self.defs), len(self.names), len(self.out.unproven_one_of), len(self.retry))
        chained = self.chain_split(node, ptr)
        if chained is not None:
            try:
                return self.vet_keywords(chained, ptr, outer)
            except UnsupportedSchemaError:
                self.restore(saved)  # vetted again as written: the refusal names the right pointer
        try:
            return self.vet_keywords(node, ptr, outer)
        except UnsupportedSchemaError:
            self.restore(saved)
            split = self.split_numbers(node, ptr)
            if split is None:
                raise
            return split

    def restore(self, saved: tuple[int, int, int, int]) -> None:
        """Forget what a failed attempt added (definitions and names only grow)."""
        for table, size in ((self.defs, saved[0]), (self.names, saved[1])):
            for key in list(table)[size:]:
                del table[key]
        del self.out.unproven_one_of[saved[2]:], self.retry[saved[3]:]

    def chain_split(self, node: dict[str, Any], ptr: tuple[str, ...]) -> dict[str, Any] | None:
        """The case split of an if/then chain, where asked for and every pointer under the node
        reads with the node's draft and base (its subschemas get new places in the split)."""
        split = split_if_chain(node) if self.split_chains and self.index.draft_at(ptr) >= 7 else None
        inner = [q for q in self.index.bases if q[:len(ptr)] == ptr] if split else []
        if any(self.index.bases[q] != self.index.base_of(ptr) or self.index.draft_at(q) != self.index.draft_at(ptr)
               for q in inner):
            return None
        return split

    def vet_keywords(self, node: dict[str, Any], ptr: tuple[str, ...], outer: list[Any]) -> Any:
        ref = self.ref(node["$ref"], ptr) if "$ref" in node else None
        clean: dict[str, Any] = {"$ref": ref} if "$ref" in node and ref else {}
        extra: list[Any] = []  # rewritten keywords, intersected through allOf
        later = [k for k in ("not", "oneOf") if k in node]  # complements need the rest as context
        for key in [k for k in node if k not in later] + later:
            if key not in VALIDATION:
                continue  # annotation, identifier or unknown keyword: no constraint
            sub = ptr + (key,)
            try:
                if key in later:
                    context = members(clean, self.deref_or_any) + extra + outer
                    self.complement_keyword(key, node[key], sub, context, clean, extra)
                else:
                    self.keyword(key, node[key], node, sub, clean, extra)
            except Unsupported as exc:  # named by the schema object holding the keyword
                self.refuse(exc.keyword, ptr, exc.reason)
        for part in extra:  # a lone anyOf can sit in the node itself; the rest intersect via allOf
            if isinstance(part, dict) and list(part) == ["anyOf"] and "anyOf" not in clean:
                clean["anyOf"] = part["anyOf"]
            else:
                clean["allOf"] = clean.get("allOf", []) + [part]
        counted = open_count(clean, self.hoist) if self.backend == "llguidance" else None
        return clean if counted is None else counted

    def hoist(self, value: Any) -> Any:
        """A subschema shared by copies of its node, moved to `$defs` once."""
        if not isinstance(value, dict) or not value or list(value) == ["$ref"]:
            return value
        name = f"c{len(self.defs)}"
        self.defs[name] = value
        return {"$ref": f"#/$defs/{name}"}

    def keyword(self, key: str, value: Any, node: dict[str, Any], sub: tuple[str, ...],
                clean: dict[str, Any], extra: list[Any]) -> None:
        support = self.support
        if key in REWRITTEN and "allOf" not in support.keywords:
            raise Unsupported(key, f"not enforced by the {self.backend} backend")
        if key == "$ref":
            pass  # resolved in vet()
        elif key in ("properties", "patternProperties"):
            self.expect(isinstance(value, dict), key, sub, "an object")
            name = _pattern if key == "patternProperties" else str
            clean[key] = {name(k): self.vet(v, sub + (k,)) for k, v in value.items()}
        elif key == "pattern":
            clean[key] = _pattern(value)
        elif key in ("anyOf", "allOf", "prefixItems"):
            self.expect(isinstance(value, list) and (value or key == "prefixItems"), key, sub, "a non-empty list")
            clean[key] = clean.get(key, []) + [self.vet(v, sub + (str(i),)) for i, v in enumerate(value)]
        elif key == "items":
            if isinstance(value, list):  # draft-04..2019-09 tuple form -> prefixItems
                clean["prefixItems"] = [self.vet(v, sub + (str(i),)) for i, v in enumerate(value)]
                if "additionalItems" in node:
                    clean["items"] = self.vet(node["additionalItems"], sub[:-1] + ("additionalItems",))
            else:
                clean["items"] = self.vet(value, sub)
        elif key == "contains" and self.contains:
            self.contains_keyword(value, node, sub, clean)
        elif key in ("additionalItems", "then", "else", "minContains", "maxContains"):
            pass  # handled with items / if / contains; alone they constrain nothing
        elif key == "additionalProperties":
            clean[key] = self.vet(value, sub)
        elif key == "if":
            self.if_then_else(node, sub, extra)
        elif key in ("dependentRequired", "dependentSchemas", "dependencies"):
            self.dependencies(key, value, sub, extra)
        elif key == "propertyNames":
            try:
                extra.extend(property_names(self.vet(value, sub), self.deref))
            except Unsupported as exc:
                raise Unsupported("propertyNames", exc.reason) from exc
        elif key == "unevaluatedProperties" and self.index.draft_at(sub) >= 2019:
            part = unevaluated_properties(node, self.vet(value, sub), self.resolve_raw, self.index.base_of(sub[:-1]))
            if part is not None and "patternProperties" in part:
                part["patternProperties"] = {_pattern(k): v for k, v in part["patternProperties"].items()}
            extra += [part] if part is not None else []
        elif key in ("unevaluatedProperties", "unevaluatedItems") and self.index.draft_at(sub) < 2019:
            pass  # not a keyword before 2019-09: an annotation
        elif key == "uniqueItems":
            if value is True and self.unique_beside:
                clean[key] = True  # checked beside the grammar (unique_check.py), not listed
            elif value is True:
                try:
                    extra.extend(unique_items(node, lambda s: self.vet(s, sub[:-1] + ("items",))))
                except Unsupported:
                    if self.backend != "llguidance":
                        raise
                    clean[key] = True  # open item set: checked beside the grammar (unique_check.py)
        elif key in ("exclusiveMinimum", "exclusiveMaximum") and isinstance(value, bool):
            bound = node.get("minimum" if key == "exclusiveMinimum" else "maximum")
            if value and isinstance(bound, (int, float)):  # draft-04: a flag on minimum/maximum
                clean[key] = bound
        elif key in ("minimum", "maximum") and node.get("exclusive" + key.title()) is True:
            pass  # became exclusiveMinimum/Maximum above
        elif key in ("minProperties", "maxProperties") and closed_count(node) is not None:
            if key == "minProperties" or "minProperties" not in node:  # both bounds at once
                extra.extend(closed_count(node))
        elif key == "format":
            self.format(value, node, sub, clean)
        elif key == "type":
            names = [value] if isinstance(value, str) else value
            self.expect(isinstance(names, list) and all(t in TYPES for t in names), key, sub, "JSON type names")
            clean[key] = value
        elif key not in support.keywords:
            raise Unsupported(key, f"not enforced by the {self.backend} backend")
        elif key in ("minLength", "maxLength", "minItems", "maxItems") and support.max_bound \
                and isinstance(value, int) and value > support.max_bound:
            raise Unsupported(key, f"bound {value} > {support.max_bound} for a regex backend")
        else:
            clean[key] = value

    def contains_keyword(self, value: Any, node: dict[str, Any], sub: tuple[str, ...], clean: dict[str, Any]) -> None:
        """`contains` kept for the Lark route (schema_contains.py): at least one item, never more."""
        counted = self.index.draft_at(sub) >= 2019
        if counted and "maxContains" in node:
            raise Unsupported("contains", "maxContains is not enforced")
        least = node.get("minContains", 1) if counted else 1
        if least == 0:
            return  # vacuous: every array has at least zero matching items
        if least != 1:
            raise Unsupported("contains", "minContains above 1 is not enforced")
        clean["contains"] = self.vet(value, sub)

    @staticmethod
    def expect(ok: bool, key: str, sub: tuple[str, ...], what: str) -> None:
        if not ok:
            raise GrammarCompileError(f"{key} at {pointer_text(sub[:-1]) or '#'} must be {what}")

    def format(self, value: Any, node: dict[str, Any], sub: tuple[str, ...], clean: dict[str, Any]) -> None:
        if value not in STANDARD_FORMATS:
            return  # custom format: an annotation (2020-12 §7.2.3: must not fail on unknown formats)
        if value in FORMAT_PATTERNS and value in self.support.formats:
            if "pattern" in node:
                clean.setdefault("allOf", []).append({"pattern": FORMAT_PATTERNS[value]})
            else:
                clean["pattern"] = FORMAT_PATTERNS[value]
        elif value in self.support.formats:
            clean["format"] = value
        else:
            raise Unsupported("format", f"format {value!r} is not enforced by {self.backend}")


@dataclass(frozen=True)
class Modes:
    """Ways of vetting used only on a retry, each exact but shaped differently for the backend."""

    split_chains: bool = False   # if/then chains on one tag as one case split (schema_if_chains.py)
    unique_beside: bool = False  # uniqueItems over enum items checked beside the grammar, not listed
    defer_not: bool = False      # a `not` inside a `not` left for the outer one (schema_double_negation.py)
    contains: bool = False       # `contains` (and "some item fails") kept for a Lark grammar (schema_contains.py)


def check_schema(spec: str | dict[str, Any] | bool, backend: str, lenient: bool = False,
                 split_chains: bool = False, unique_beside: bool = False, contains: bool = False) -> CheckedSchema:
    """Vet every keyword for `backend`; raises UnsupportedSchemaError unless lenient.
    `split_chains`, `unique_beside`: the retries for a schema the backend found too large (see
    Modes; each is exact but gives the backend a differently shaped grammar)."""
    root = parse_schema(spec)
    if root is False:
        raise GrammarCompileError("json_schema `false` accepts no document")
    modes = Modes(split_chains, unique_beside, contains=contains)
    try:
        return _checked(root, backend, lenient, modes)
    except UnsupportedSchemaError as exc:
        if exc.keyword != "not" or lenient:
            raise
        try:  # a `not` inside a `not` may cancel out (schema_double_negation.py)
            return _checked(root, backend, lenient, dataclasses.replace(modes, defer_not=True))
        except UnsupportedSchemaError:
            raise exc from None


def _checked(root: dict[str, Any] | bool, backend: str, lenient: bool, modes: Modes) -> CheckedSchema:
    canonical = json.dumps(root, separators=(",", ":"), ensure_ascii=False)
    out = CheckedSchema(schema=True, canonical=canonical)
    vetter = _Vetter({} if root is True else root, backend, lenient, out, modes)
    schema = vetter.vet(vetter.root, ())
    vetter.retry_one_of()
    left = vetter.pending.surviving(schema, vetter.defs)
    if left is not None:
        vetter.refuse("not", *left)
    if vetter.defs:
        schema = {"allOf": [schema]} if isinstance(schema, bool) else schema
        schema["$defs"] = vetter.defs
    if backend == "llguidance":  # it keeps named properties in schema order
        simplify(schema)
        unique, counted = has_unique(schema), counts_keys(schema)
        if unique or counted:  # before the reordering below: it makes properties patterns
            try:
                out.unique = check_paths(schema, unique, counted)
            except Unsupported as exc:
                vetter.refuse("uniqueItems", (), exc.reason)
            strip_unique(schema)
        free_optional_order(schema)
        lead_with_schema_key(schema)
        cut_deep_nesting(schema)
        mark_integer_gaps(schema, vetter.refuse, modes.contains)
        if counts_keys(schema) and not counted:  # a count the rewrites above made: every object, to be safe
            out.unique = dataclasses.replace(out.unique or NO_UNIQUE_ARRAYS, distinct_keys=True, distinct_at=())
    out.schema = schema
    out.recursive = has_recursion(vetter.defs)
    looping = same_instance_cycle(vetter.defs) if out.recursive else None
    if looping is not None:
        vetter.refuse("$ref", ("$defs", looping), "a reference cycle back to the same instance "
                                                  "(no property or item in between): validation never ends")
    if out.recursive and not SUPPORT[backend].recursion:
        vetter.refuse("$ref", (), "recursive references need a context-free backend")
    return out

