"""`compile()`: spec -> Grammar through a chosen backend, behind an LRU cache.

The cache key is (spec kind, canonical spec text, tokenizer fingerprint, backend, options):
two requests with the same schema share one compiled grammar, and a grammar compiled for
one vocabulary is never reused with another.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import json
import re
import threading
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from .base import Grammar
from .errors import GrammarCompileError, UnsupportedSchemaError
from .schema import CheckedSchema, check_schema, parse_schema
from .schema_contains import contains_lark
from .schema_negation import Unsupported
from .schema_refs import subschemas
from .schema_string_fold import fold_string_schema
from .unique_check import PAYLOAD_TAG, UniqueGrammar
from .unique_check import from_payload as unique_from_payload
from .vocab import TokenizerInfo

# Measured on our corpus (see README.md): llguidance compiles ~100x faster than the
# alternatives at similar mask cost, and covers recursion and EBNF.
BACKENDS = ("llguidance", "xgrammar", "outlines")
DEFAULT_BACKEND = "llguidance"
WHITESPACE_MAX = 20  # flexible (compact or pretty-printed) but bounded: no runaway newlines
_MODULES = {
    "llguidance": ("llguidance", ".backends.llguidance_backend"),
    "xgrammar": ("xgrammar", ".backends.xgrammar_backend"),
    "outlines": ("outlines_core", ".backends.outlines_backend"),
}
SpecKey = tuple[str, str, str, str, bool, int]
# schema_relative's refusals that the Lark route may write
_LARK_WRITES = ("some key's value fails", "non-integer numbers", "complement of 'multipleOf'",
                "no integer inside")  # the last: schema_integer_gap.REASON


def available_backends() -> list[str]:
    """Backends whose library is installed, in order of preference."""
    return [name for name in BACKENDS if importlib.util.find_spec(_MODULES[name][0]) is not None]


def default_backend() -> str:
    found = available_backends()
    if not found:
        raise RuntimeError("no grammar backend installed (need llguidance or outlines-core)")
    return DEFAULT_BACKEND if DEFAULT_BACKEND in found else found[0]


def backend_module(name: str) -> Any:
    if name not in _MODULES:
        raise ValueError(f"unknown grammar backend {name!r}; choose from {', '.join(BACKENDS)}")
    if importlib.util.find_spec(_MODULES[name][0]) is None:
        raise ValueError(f"grammar backend {name!r} is not installed (pip install {_MODULES[name][0]})")
    return importlib.import_module(_MODULES[name][1], __package__)


class GrammarCache:
    """Thread-safe LRU of compiled grammars (a schema compiled once serves every request)."""

    def __init__(self, capacity: int = 256) -> None:
        self.capacity = capacity
        self._items: OrderedDict[Any, Grammar] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = self.misses = 0

    def get(self, key: Any) -> Grammar | None:
        with self._lock:
            grammar = self._items.get(key)
            if grammar is None:
                self.misses += 1
                return None
            self.hits += 1
            self._items.move_to_end(key)
            return grammar

    def put(self, key: Any, grammar: Grammar) -> None:
        with self._lock:
            self._items[key] = grammar
            self._items.move_to_end(key)
            while len(self._items) > self.capacity:
                self._items.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self._items.clear()

    def __len__(self) -> int:
        return len(self._items)


CACHE = GrammarCache()


def _one_spec(regex: Any, json_schema: Any, ebnf: Any, choices: Any) -> tuple[str, Any]:
    given = [(k, v) for k, v in (("regex", regex), ("json_schema", json_schema), ("ebnf", ebnf),
                                 ("choices", choices)) if v is not None]
    if len(given) != 1:
        raise ValueError("pass exactly one of regex=, json_schema=, ebnf=, choices= "
                         f"(got {', '.join(k for k, _ in given) or 'none'})")
    return given[0]


def prepare(kind: str, spec: Any, backend: str, lenient: bool = False,
            whitespace_max: int = WHITESPACE_MAX) -> tuple[str, Callable[[TokenizerInfo], Grammar]]:
    """Validate a spec cheaply (no tokenizer needed) -> (canonical text, builder).

    Split from compile() so the grammar service can key and dedupe requests in the caller
    and run only the builder in its worker.
    """
    mod = backend_module(backend)
    if kind == "json_schema":
        lark = None
        try:
            checked = check_schema(spec, backend, lenient)
        except UnsupportedSchemaError as exc:
            refusals: list[UnsupportedSchemaError] = []
            retried = _contains_retry(spec, backend, lenient, whitespace_max, [exc.keyword, exc.reason], refusals)
            if retried is None:
                if refusals and refusals[0].keyword == exc.keyword == "contains":
                    raise refusals[0] from None  # names what of `contains` is not enforced (maxContains ...)
                raise
            checked, lark = retried
        if lark is not None:
            text, canonical = lark, checked.canonical
            return canonical, lambda info: _map_errors(lambda: _with_unique(mod.compile_lark(info, text, canonical),
                                                                            checked), checked)
        if backend == "outlines":
            return checked.canonical, lambda info: mod.compile_json_schema(info, checked, whitespace_max)
        def build_json(info: TokenizerInfo) -> Grammar:
            def once(c: CheckedSchema) -> Grammar:
                return _with_unique(mod.compile_json_schema(info, c.schema, c.canonical, whitespace_max), c)

            try:
                return _map_errors(lambda: _too_large_retry(lambda c: _empty_defs_retry(once, c), checked, spec,
                                                            backend, lenient), checked)
            except GrammarCompileError:  # a oneOf left to the backend: retried with "some item fails" kept
                fallback = checked.unproven_one_of and _contains_retry(spec, backend, lenient, whitespace_max,
                                                                       [w for _, w in checked.unproven_one_of])
                if not fallback or fallback[1] is None:
                    raise
                return _with_unique(mod.compile_lark(info, fallback[1], checked.canonical), fallback[0])

        return checked.canonical, build_json
    if kind == "regex":
        if not isinstance(spec, str):
            raise GrammarCompileError("regex must be a string")
        return spec, lambda info: mod.compile_regex(info, spec)
    if kind == "choices":
        if not isinstance(spec, (list, tuple)) or not spec or not all(isinstance(c, str) for c in spec):
            raise GrammarCompileError("choices must be a non-empty list of strings")
        canonical = json.dumps(list(spec), ensure_ascii=False)
        return canonical, lambda info: mod.compile_choices(info, list(spec), canonical)
    if kind == "ebnf":
        if not isinstance(spec, str):
            raise GrammarCompileError("ebnf must be a string")
        if not hasattr(mod, "compile_ebnf"):
            raise GrammarCompileError(f"the {backend} backend compiles regular languages only; "
                                      "use llguidance or xgrammar for EBNF")
        return spec, lambda info: mod.compile_ebnf(info, spec)
    raise ValueError(f"unknown spec kind {kind!r}")


def _contains_retry(spec: Any, backend: str, lenient: bool, whitespace_max: int, why: list[str],
                    refusals: list[UnsupportedSchemaError] | None = None) -> tuple[CheckedSchema, str | None] | None:
    """A schema refused over `contains` or "some item fails", vetted once more with both kept, and
    its Lark (schema_contains.py; None where the vetted schema keeps no `contains`). None where
    this route does not apply exactly: the caller keeps its own verdict (`refusals` gets the
    retry's own refusal, which says what of `contains` is not enforced)."""
    if backend != "llguidance" or lenient or not any("contains" in w or "'items'" in w or any(x in w for x in _LARK_WRITES)
                                                     for w in why):
        return None
    try:
        checked = check_schema(spec, backend, contains=True)
        if checked.unproven_one_of or checked.unique is not None and any(checked.unique.enforce):
            return None  # unique arrays are not on the route (distinct keys alone are: `_with_unique`)
        mod = backend_module(backend)
        return checked, contains_lark(checked.schema, mod.json_schema_empty, mod.json_options(whitespace_max),
                                      whitespace_max)
    except Unsupported:
        return None
    except UnsupportedSchemaError as exc:
        if refusals is not None:
            refusals.append(exc)
        return None


def _with_unique(grammar: Grammar, checked: CheckedSchema) -> Grammar:
    """The grammar, wrapped with the run-time uniqueItems check where the schema needs one."""
    return grammar if checked.unique is None else UniqueGrammar(grammar, checked.unique)


# llguidance's refusal of a whole unsatisfiable definition: the innermost context is the definition.
_UNSAT_DEF = re.compile(r"Unsatisfiable schema:[^\n]*\n\s*while processing \S*#/\$defs/([^/\s]+)\s*(?:\n|$)")
MAX_EMPTY_DEFS = 8


def _empty_defs_retry(build: Callable[[CheckedSchema], Grammar], checked: CheckedSchema) -> Grammar:
    """llguidance drops unsatisfiable `anyOf` branches and optional properties itself, but stops at
    a `$defs` entry that as a whole accepts nothing, wherever it is referenced (JsonSchemaStore---
    typo3: a route object with `additionalProperties: false` whose if/then require keys it
    forbids, used as the items of an array that may be empty). Such a definition says what `false`
    says; it is written so and the build retried (a few times: emptiness spreads to definitions
    that require it). The backend's own emptiness proof is the language it would enforce anyway."""
    for _ in range(MAX_EMPTY_DEFS):
        try:
            return build(checked)
        except GrammarCompileError as exc:
            found = _UNSAT_DEF.search(str(exc))
            defs = checked.schema.get("$defs") if isinstance(checked.schema, dict) else None
            if found is None or not isinstance(defs, dict) or found.group(1) not in defs:
                raise
            schema = _without_def(checked.schema, found.group(1))
            if schema is False:  # the root itself references it: nothing is valid, the backend's answer stands
                raise
            checked = dataclasses.replace(checked, schema=schema)
    return build(checked)


def _without_def(schema: dict[str, Any], name: str) -> dict[str, Any] | bool:
    """A copy without `$defs[name]`, each subschema that references it written `false` (a
    conjunction with an empty schema is empty; llguidance takes an inline `false`, not a `$ref`
    to one)."""
    ref = f"#/$defs/{name}"

    def copy(node: Any) -> Any:
        if not isinstance(node, dict):
            return node
        if node.get("$ref") == ref:
            return False
        out = dict(node)
        for rel in subschemas(node):
            if len(rel) == 2 and out[rel[0]] is node[rel[0]]:  # a list or map of subschemas: copied once
                out[rel[0]] = list(node[rel[0]]) if isinstance(node[rel[0]], list) else dict(node[rel[0]])
        for rel in subschemas(node):
            if len(rel) == 1:
                out[rel[0]] = copy(node[rel[0]])
            else:
                container = out[rel[0]]
                index = int(rel[1]) if isinstance(container, list) else rel[1]
                container[index] = copy(container[index])
        return out

    result = copy(schema)
    if result is False:
        return False
    result["$defs"] = {k: v for k, v in result["$defs"].items() if k != name}
    return result


def _too_large_retry(build: Callable[[CheckedSchema], Grammar], checked: CheckedSchema, spec: Any,
                     backend: str, lenient: bool) -> Grammar:
    """A schema the backend finds too large (its allOf of if/then pairs multiplied out) is vetted
    again with if/then chains on one tag as one case split (schema_if_chains.py): the same
    instances, N + 3 branches instead of 2^N. A string schema whose pattern combinations the
    backend cannot decide is vetted again as one pattern (schema_string_fold.py). Still too large:
    `uniqueItems` over enum items, listed as an enum of every unique array (1,957 arrays for 6
    values), is checked beside the grammar instead (unique_paths.py). Only then, so that no
    schema that compiles as written gets a differently shaped grammar."""
    try:
        return build(checked)
    except GrammarCompileError as exc:
        if "Unable to determine if regex is empty" in str(exc):
            folded = fold_string_schema(parse_schema(spec))
            if folded is None:
                raise
            return build(check_schema(folded, backend, lenient))
        if "schema too large" not in str(exc):
            raise
    try:
        return build(check_schema(spec, backend, lenient, split_chains=True))
    except GrammarCompileError as exc:
        if "schema too large" not in str(exc):
            raise
        too_large = exc
    try:  # unique arrays of enum items checked beside the grammar, not listed as an enum
        return build(check_schema(spec, backend, lenient, split_chains=True, unique_beside=True))
    except GrammarCompileError:
        raise too_large from None


def _map_errors(build: Callable[[], Grammar], checked: CheckedSchema) -> Grammar:
    """Backend messages about unimplemented features become UnsupportedSchemaError; a `oneOf`
    we could not prove disjoint (and the backend could not either) is named with its pointer."""
    try:
        return build()
    except GrammarCompileError as exc:
        text = str(exc)
        if "oneOf" in text and checked.unproven_one_of:
            path, why = checked.unproven_one_of[0]
            raise UnsupportedSchemaError("oneOf", path, why) from exc
        if "not supported" in text or "Unimplemented" in text or "Unknown format" in text:
            raise UnsupportedSchemaError("schema", "#", text) from exc
        raise


def spec_key(kind: str, canonical: str, info: TokenizerInfo, backend: str, lenient: bool,
             whitespace_max: int) -> SpecKey:
    return (kind, canonical, info.fingerprint, backend, lenient, whitespace_max)


def compile(tokenizer: Any, *, regex: str | None = None,
            json_schema: str | dict[str, Any] | bool | None = None, ebnf: str | None = None,
            choices: list[str] | None = None, backend: str | None = None, lenient: bool = False,
            whitespace_max: int = WHITESPACE_MAX, cache: GrammarCache | None = CACHE) -> Grammar:
    """Compile exactly one spec for `tokenizer` (an HF tokenizer or a TokenizerInfo).

    Raises ValueError for bad arguments, GrammarCompileError for a bad spec and
    UnsupportedSchemaError for schema keywords the backend cannot enforce (unless lenient).
    """
    kind, spec = _one_spec(regex, json_schema, ebnf, choices)
    backend = backend or default_backend()
    info = TokenizerInfo.from_tokenizer(tokenizer)
    canonical, build = prepare(kind, spec, backend, lenient, whitespace_max)
    key = spec_key(kind, canonical, info, backend, lenient, whitespace_max)
    if cache is not None:
        hit = cache.get(key)
        if hit is not None:
            return hit
    grammar = build(info)
    if cache is not None:
        cache.put(key, grammar)
    return grammar


def grammar_from_payload(info: TokenizerInfo, backend: str, payload: Any) -> Grammar:
    """Rebuild a grammar shipped from another process (see Grammar.payload)."""
    if isinstance(payload, (tuple, list)) and payload and payload[0] == PAYLOAD_TAG:
        return unique_from_payload(info, payload, lambda inner: grammar_from_payload(info, backend, inner))
    mod = backend_module(backend)
    cls = {"llguidance": "LLGuidanceGrammar", "xgrammar": "XGrammarGrammar",
           "outlines": "OutlinesGrammar"}[backend]
    return getattr(mod, cls).from_payload(info, payload)
