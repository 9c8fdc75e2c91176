"""`$ref` resolution inside one schema document: base URIs from `$id` (draft-04 `id`), anchors,
JSON pointers (RFC 6901, percent-decoded per RFC 3986 fragments).

We resolve every reference ourselves and hand backends plain `#/$defs/<name>` references, so
what a backend enforces is exactly what the specification's resolution says, whichever draft.
Anything outside the document (a remote schema) is refused.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import unquote, urldefrag, urljoin

DEFAULT_BASE = "https://radixlm.invalid/schema.json"
Pointer = tuple[str, ...]

# Where subschemas sit, per keyword: one schema, a list of schemas, a map of schemas.
SUB_ONE = ("additionalProperties", "items", "contains", "not", "if", "then", "else",
           "propertyNames", "unevaluatedProperties", "unevaluatedItems", "additionalItems")
SUB_LIST = ("anyOf", "oneOf", "allOf", "prefixItems")
SUB_MAP = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")


def join(base: str, ref: str) -> str:
    """`ref` resolved against `base` (RFC 3986 §5.2). urllib's urljoin returns `ref` unchanged
    under a scheme it does not list as hierarchical (`urn:`, `tag:`: `$id` URNs are common), so a
    same-document `#/$defs/x` would lose its base: a fragment-only reference keeps the base
    whatever its scheme (§5.2.2: the base's path and query, the reference's fragment)."""
    if ref.startswith("#"):
        return urldefrag(base)[0] + ref
    return urljoin(base, ref)


def escape(token: str) -> str:
    return token.replace("~", "~0").replace("/", "~1")


def pointer_text(ptr: Pointer) -> str:
    return "".join("/" + escape(p) for p in ptr)


def subschemas(node: dict[str, Any]) -> list[tuple[str, ...]]:
    """Relative pointers of the immediate subschemas of a schema object."""
    out: list[tuple[str, ...]] = []
    for key, value in node.items():
        if key in SUB_ONE:
            if isinstance(value, list):  # draft-04 tuple form of items
                out.extend((key, str(i)) for i in range(len(value)))
            else:
                out.append((key,))
        elif key in SUB_LIST and isinstance(value, list):
            out.extend((key, str(i)) for i in range(len(value)))
        elif key in SUB_MAP and isinstance(value, dict):
            out.extend((key, k) for k in value)
        elif key == "dependencies" and isinstance(value, dict):
            out.extend((key, k) for k, v in value.items() if isinstance(v, (dict, bool)))
    return out


def get(root: Any, ptr: Pointer) -> Any:
    node = root
    for part in ptr:
        if isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        elif isinstance(node, dict) and part in node:
            node = node[part]
        else:
            raise KeyError(pointer_text(ptr))
    return node


def draft_of(node: Any, default: int = 2020) -> int:
    """4, 6, 7, 2019 or 2020 from a `$schema` (absent or unknown: `default`)."""
    uri = node.get("$schema") if isinstance(node, dict) else None
    if isinstance(uri, str):
        for mark, draft in (("draft-03", 4), ("draft-04", 4), ("draft-06", 6), ("draft-07", 7),
                            ("2019-09", 2019), ("2020-12", 2020)):
            if mark in uri:
                return draft
    return default


class RefIndex:
    """Per schema location: base URI and draft (the nearest `$schema`, else the latest);
    resources by URI, anchors by URI#name."""

    def __init__(self, root: Any) -> None:
        self.root = root
        self.bases: dict[Pointer, str] = {}
        self.drafts: dict[Pointer, int] = {}
        self.resources: dict[str, Pointer] = {}
        self.anchors: dict[str, Pointer] = {}
        self._index(root, (), DEFAULT_BASE, 2020)
        self.resources.setdefault(DEFAULT_BASE, ())

    def _index(self, node: Any, ptr: Pointer, base: str, draft: int) -> None:
        if not isinstance(node, dict):
            return
        draft = draft_of(node, draft)
        ident = node.get("id" if draft == 4 else "$id")
        if isinstance(ident, str):
            if ident.startswith("#"):  # draft-04..07 plain-name fragment: an anchor
                self.anchors[join(base, ident)] = ptr
            else:
                base, _ = urldefrag(join(base, ident))
                self.resources.setdefault(base, ptr)
        anchor = node.get("$anchor")
        if isinstance(anchor, str):
            self.anchors[f"{base}#{anchor}"] = ptr
        self.bases[ptr], self.drafts[ptr] = base, draft
        for rel in subschemas(node):
            self._index(get(node, rel), ptr + rel, base, draft)

    def draft_at(self, ptr: Pointer) -> int:
        for cut in range(len(ptr), -1, -1):
            draft = self.drafts.get(ptr[:cut])
            if draft is not None:
                return draft
        return 2020

    def base_of(self, ptr: Pointer) -> str:
        """The base URI in effect at `ptr` (nearest indexed ancestor for non-schema places)."""
        for cut in range(len(ptr), -1, -1):
            base = self.bases.get(ptr[:cut])
            if base is not None:
                return base
        return DEFAULT_BASE

    def resolve(self, ref: str, base: str) -> Pointer | None:
        """Document pointer of the referenced schema; None when it is not in this document."""
        target = join(base, ref)
        uri, fragment = urldefrag(target)
        if uri not in self.resources:
            return None
        start = self.resources[uri]
        if not fragment:
            return start
        if not fragment.startswith("/"):
            return self.anchors.get(f"{uri}#{unquote(fragment)}")
        parts = tuple(p.replace("~1", "/").replace("~0", "~") for p in unquote(fragment).split("/")[1:])
        ptr = start + parts
        try:
            get(self.root, ptr)
        except KeyError:
            return None
        return ptr


def has_recursion(defs: dict[str, Any]) -> bool:
    """True if some `#/$defs/rN` can reach itself."""
    edges: dict[str, set[str]] = {}

    def collect(node: Any, acc: set[str]) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                if k == "$ref" and isinstance(v, str):
                    acc.add(v.rsplit("/", 1)[-1])
                else:
                    collect(v, acc)
        elif isinstance(node, list):
            for v in node:
                collect(v, acc)

    for name, target in defs.items():
        edges[name] = set()
        collect(target, edges[name])
    state: dict[str, int] = {}

    def cyclic(name: str) -> bool:
        if state.get(name) == 1:
            return True
        if state.get(name) == 2:
            return False
        state[name] = 1
        if any(cyclic(r) for r in edges.get(name, ())):
            return True
        state[name] = 2
        return False

    return any(cyclic(n) for n in edges)


# Applicators whose subschemas apply to the instance itself (not to a property value or an item).
_SAME_INSTANCE = ("allOf", "anyOf", "oneOf", "not", "if", "then", "else", "dependentSchemas", "$defs")


def same_instance_cycle(defs: dict[str, Any]) -> str | None:
    """A `#/$defs/rN` that reaches itself through references and in-place applicators only (no
    property or item in between), or None: `{"$ref": "#/$defs/a"}` as `a`, or `a` in its own
    `anyOf`. Validating such a schema never ends (jsonschema recurses until Python's limit), so
    it has no meaning to enforce."""
    edges: dict[str, set[str]] = {}

    def collect(node: Any, acc: set[str]) -> None:
        if isinstance(node, list):
            for v in node:
                collect(v, acc)
        elif isinstance(node, dict):
            ref = node.get("$ref")
            if isinstance(ref, str) and ref.startswith("#/$defs/"):
                acc.add(ref.rsplit("/", 1)[-1])
            for k in _SAME_INSTANCE:
                if k == "dependentSchemas" and isinstance(node.get(k), dict):
                    collect(list(node[k].values()), acc)
                elif k != "$defs":
                    collect(node.get(k), acc)

    for name, target in defs.items():
        edges[name] = set()
        collect(target, edges[name])
    done: set[str] = set()

    def reaches(start: str) -> bool:
        stack, seen = list(edges.get(start, ())), set()
        while stack:
            name = stack.pop()
            if name == start:
                return True
            if name not in seen and name not in done:
                seen.add(name)
                stack.extend(edges.get(name, ()))
        return False

    for name in edges:
        if reaches(name):
            return name
        done.add(name)
    return None
