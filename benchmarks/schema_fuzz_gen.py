"""The random side of benchmarks/schema_fuzz.py: seeded JSON schemas over the validation vocabulary
we accept, nested a few levels (`gen_schema`), instances aimed at a schema (`Instances`, best
effort: jsonschema labels them) and one-change mutations of documents (`mutate`)."""

from __future__ import annotations

import copy
import json
import random
import string
from typing import Any

DRAFT4 = "http://json-schema.org/draft-04/schema#"
KEYS = ["a", "b", "c", "id", "x1", "name"]
PATTERNS = {"^[a-z]+$": ["abc", "z"], "^a": ["a", "ab1"], "b$": ["b", "xb"], "^[0-9]{2,4}$": ["12", "2024"],
            "x": ["x", "axb"], "^(ab|cd)*$": ["", "abcd"], "^[A-Z][a-z]?$": ["A", "Qz"]}
FORMATS = {"date": ["2024-02-29", "1999-12-31"], "time": ["12:30:00Z", "23:59:59+01:00"],
           "date-time": ["2024-01-01T00:00:00Z"], "email": ["a@b.co"], "ipv4": ["10.0.0.1", "255.255.255.255"],
           "ipv6": ["::1", "fe80::1"], "uuid": ["123e4567-e89b-12d3-a456-426614174000"],
           "uri": ["http://a.b/c"], "hostname": ["example.com", "a"], "uri-reference": ["../x", "#f"]}


def scalar(rng: random.Random) -> Any:
    return rng.choice([None, True, False, 0, 1, -3, 2.5, 7, "a", "b", "", "xyz", "0"])


def value(rng: random.Random, depth: int = 1) -> Any:
    """A random JSON value (enum/const members, filler for keys and items)."""
    r = rng.random()
    if depth <= 0 or r < 0.6:
        return scalar(rng)
    if r < 0.8:
        return [value(rng, depth - 1) for _ in range(rng.randint(0, 2))]
    return {rng.choice(KEYS): value(rng, depth - 1) for _ in range(rng.randint(0, 2))}


class Gen:
    """One schema document: `$defs` filled as references are made (a reference may point at a
    definition under construction: recursion)."""

    def __init__(self, rng: random.Random) -> None:
        self.rng, self.defs, self.draft4 = rng, {}, rng.random() < 0.12

    def document(self) -> Any:
        root = self.node(3)
        if not isinstance(root, dict):
            return root
        if self.defs:
            root["definitions" if self.draft4 else "$defs"] = self.defs
        if self.draft4:
            root["$schema"] = DRAFT4
        return root

    def node(self, depth: int) -> Any:
        rng = self.rng
        kinds = ["string", "integer", "number", "leaf", "enum", "const", "object", "array", "types"]
        if depth > 0:
            kinds += ["object", "array", "allOf", "anyOf", "oneOf", "not", "ref"] + ([] if self.draft4 else ["if"])
        kind = rng.choice(kinds)
        if depth <= 0 and rng.random() < 0.04:
            return {} if self.draft4 else rng.choice([True, False, {}])  # no boolean schemas in draft 04
        return getattr(self, "k_" + kind.lower())(depth)

    def k_leaf(self, depth: int) -> dict[str, Any]:
        return {"type": self.rng.choice(["boolean", "null", "string", "integer"])}

    def k_types(self, depth: int) -> dict[str, Any]:
        types = self.rng.sample(["string", "integer", "number", "null", "boolean", "array", "object"], 2)
        extra = self.k_string(0) if "string" in types else self.k_integer(0)
        out = {k: v for k, v in extra.items() if k != "type" and (self.draft4 or self.rng.random() < 0.6)}
        return {"type": types, **out}

    def k_string(self, depth: int) -> dict[str, Any]:
        rng, out = self.rng, {"type": "string"}
        if rng.random() < 0.4:
            out["minLength"] = rng.randint(0, 3)
        if rng.random() < 0.4:
            out["maxLength"] = rng.randint(out.get("minLength", 0), 6)
        if rng.random() < 0.3:
            out["pattern"] = rng.choice(sorted(PATTERNS))
        elif rng.random() < 0.25:
            out["format"] = rng.choice(sorted(FORMATS))
        return out

    def _bounds(self, out: dict[str, Any], lo: float, hi: float) -> None:
        rng = self.rng
        a, b = sorted(rng.choice([lo, hi, (lo + hi) / 2, lo - 1.5]) for _ in range(2))
        for key, exclusive, bound in (("minimum", "exclusiveMinimum", a), ("maximum", "exclusiveMaximum", b)):
            if rng.random() < 0.5:
                if self.draft4:  # a flag on minimum/maximum
                    out[key] = bound
                    if rng.random() < 0.5:
                        out[exclusive] = rng.random() < 0.7
                else:
                    out[exclusive if rng.random() < 0.3 else key] = bound

    def k_integer(self, depth: int) -> dict[str, Any]:
        out: dict[str, Any] = {"type": "integer"}
        self._bounds(out, self.rng.choice([-5, 0, 3]), self.rng.choice([4, 10, 100]))
        if self.rng.random() < 0.3:
            out["multipleOf"] = self.rng.choice([2, 3, 5, 10])
        return out

    def k_number(self, depth: int) -> dict[str, Any]:
        out: dict[str, Any] = {"type": "number"}
        self._bounds(out, self.rng.choice([-2.5, 0, 0.5]), self.rng.choice([1, 2.75, 50]))
        if self.rng.random() < 0.3:
            out["multipleOf"] = self.rng.choice([0.5, 0.25, 2, 1.5, 0.1])
        return out

    def k_enum(self, depth: int) -> dict[str, Any]:
        vals = [value(self.rng, 2) for _ in range(self.rng.randint(1, 4))]
        uniq = [v for i, v in enumerate(vals) if all(json.dumps(v) != json.dumps(w) for w in vals[:i])]
        return {"enum": uniq}

    def k_const(self, depth: int) -> dict[str, Any]:
        if self.draft4:
            return self.k_enum(depth)
        return {"const": value(self.rng, 2)}

    def k_object(self, depth: int) -> dict[str, Any]:
        rng = self.rng
        names = rng.sample(KEYS[:4] + KEYS[5:], rng.randint(0, 3))
        out: dict[str, Any] = {"type": "object"} if rng.random() < 0.85 else {}
        if names:
            out["properties"] = {k: self.node(depth - 1) for k in names}
            req = [k for k in names if rng.random() < 0.5]
            if req:
                out["required"] = req
        r = rng.random()
        if r < 0.3:
            out["additionalProperties"] = False
        elif r < 0.45:
            out["additionalProperties"] = self.node(depth - 1)
        if rng.random() < 0.2:
            out["patternProperties"] = {"^x": self.node(depth - 1)}
        if not self.draft4 and rng.random() < 0.15:
            out["propertyNames"] = rng.choice([{"maxLength": 2}, {"pattern": "^[a-c]"}, {"enum": ["a", "b", "x1"]}])
        if rng.random() < 0.2:
            out["minProperties"] = rng.randint(0, 2)
        if rng.random() < 0.15:
            out["maxProperties"] = rng.randint(out.get("minProperties", 0), 3)
        if names and rng.random() < 0.2:
            dep = {rng.choice(names): [rng.choice(KEYS)]}
            out["dependencies" if self.draft4 else "dependentRequired"] = dep
        if names and not self.draft4 and rng.random() < 0.1:
            out["dependentSchemas"] = {rng.choice(names): self.k_object(0)}
        return out

    def k_array(self, depth: int) -> dict[str, Any]:
        rng = self.rng
        out: dict[str, Any] = {"type": "array"} if rng.random() < 0.85 else {}
        if not self.draft4 and rng.random() < 0.25:
            out["prefixItems"] = [self.node(depth - 1) for _ in range(rng.randint(1, 2))]
            if rng.random() < 0.5:
                out["items"] = False if rng.random() < 0.5 else self.node(depth - 1)
        elif self.draft4 and rng.random() < 0.2:
            out["items"] = [self.node(depth - 1) for _ in range(rng.randint(1, 2))]
            if rng.random() < 0.5:
                out["additionalItems"] = False
        elif rng.random() < 0.8:
            out["items"] = self.node(depth - 1)
        if rng.random() < 0.35:
            out["minItems"] = rng.randint(0, 2)
        if rng.random() < 0.35:
            out["maxItems"] = rng.randint(out.get("minItems", 0), 4)
        if rng.random() < 0.2:
            out["uniqueItems"] = True
        if not self.draft4 and rng.random() < 0.2:
            out["contains"] = self.node(depth - 1)
            if rng.random() < 0.4:
                out["minContains"] = rng.randint(0, 2)
            if rng.random() < 0.3:
                out["maxContains"] = rng.randint(1, 3)
        return out

    def _members(self, depth: int) -> list[Any]:
        return [self.node(depth - 1) for _ in range(self.rng.randint(1, 3))]

    def k_allof(self, depth: int) -> dict[str, Any]:
        return {"allOf": self._members(depth)}

    def k_anyof(self, depth: int) -> dict[str, Any]:
        return {"anyOf": self._members(depth)}

    def k_oneof(self, depth: int) -> dict[str, Any]:
        return {"oneOf": self._members(depth)}

    def k_not(self, depth: int) -> dict[str, Any]:
        inner = self.node(depth - 1)
        return {"not": inner} if self.rng.random() < 0.5 else {**self.k_leaf(0), "not": inner}

    def k_if(self, depth: int) -> dict[str, Any]:
        out = {"if": self.node(depth - 1), "then": self.node(depth - 1)}
        if self.rng.random() < 0.6:
            out["else"] = self.node(depth - 1)
        return out

    def k_ref(self, depth: int) -> dict[str, Any]:
        where = "definitions" if self.draft4 else "$defs"
        if self.defs and self.rng.random() < 0.4:
            return {"$ref": f"#/{where}/{self.rng.choice(sorted(self.defs))}"}
        name = f"d{len(self.defs)}"
        self.defs[name] = {}
        if self.rng.random() < 0.3:  # recursive: a list or a tree of itself, kept finite by anyOf/optional
            self.defs[name] = {"anyOf": [{"type": "integer"}, {"type": "array", "maxItems": 2,
                                                                "items": {"$ref": f"#/{where}/{name}"}}]}
        else:
            self.defs[name] = self.node(depth - 1)
        return {"$ref": f"#/{where}/{name}"}


def gen_schema(rng: random.Random) -> Any:
    return Gen(rng).document()


class Instances:
    """Candidate instances aimed at a schema (best effort: jsonschema labels them afterwards)."""

    def __init__(self, root: Any, rng: random.Random) -> None:
        self.root, self.rng = root, rng

    def resolve(self, ref: str) -> Any:
        node = self.root
        for part in ref.lstrip("#/").split("/"):
            node = node[part]
        return node

    def make(self, schema: Any, depth: int = 6) -> Any:
        rng = self.rng
        if schema is True or schema is False or not isinstance(schema, dict) or depth <= 0:
            return value(rng)
        if "$ref" in schema:
            return self.make(self.resolve(schema["$ref"]), depth - 1)
        if "const" in schema:
            return copy.deepcopy(schema["const"])
        if "enum" in schema and schema["enum"]:
            return copy.deepcopy(rng.choice(schema["enum"]))
        rest = {k: v for k, v in schema.items() if k not in ("allOf", "anyOf", "oneOf", "if", "then", "else")}
        for key in ("anyOf", "oneOf"):
            if key in schema:
                pick = rng.choice(schema[key])
                return self.make({**rest, **pick} if isinstance(pick, dict) else rest, depth - 1)
        if "allOf" in schema:
            merged = dict(rest)
            for member in schema["allOf"]:
                if isinstance(member, dict):
                    merged.update(member)
            return self.make(merged, depth - 1)
        if "if" in schema:
            branch = schema.get("then") if rng.random() < 0.5 else schema.get("else")
            cond = schema["if"] if branch is schema.get("then") else {}
            parts = [p for p in (cond, branch) if isinstance(p, dict)]
            return self.make({**rest, **{k: v for p in parts for k, v in p.items()}}, depth - 1)
        types = schema.get("type")
        kind = rng.choice(types) if isinstance(types, list) else types
        if kind is None:
            kind = ("object" if "properties" in schema else "array" if "items" in schema or "prefixItems" in schema
                    else "string" if "pattern" in schema or "minLength" in schema else
                    "number" if "minimum" in schema or "multipleOf" in schema else None)
        return getattr(self, "m_" + kind)(schema, depth) if kind else value(rng)

    def m_null(self, schema: dict[str, Any], depth: int) -> Any:
        return None

    def m_boolean(self, schema: dict[str, Any], depth: int) -> Any:
        return self.rng.random() < 0.5

    def m_string(self, schema: dict[str, Any], depth: int) -> Any:
        rng = self.rng
        if schema.get("pattern") in PATTERNS:
            return rng.choice(PATTERNS[schema["pattern"]])
        if schema.get("format") in FORMATS:
            return rng.choice(FORMATS[schema["format"]])
        lo = schema.get("minLength", 0)
        n = rng.randint(lo, max(lo, schema.get("maxLength", lo + 4)))
        return "".join(rng.choice(string.ascii_lowercase + "é\"\\ ") for _ in range(n))

    def m_integer(self, schema: dict[str, Any], depth: int) -> Any:
        lo, hi = self._range(schema)
        step = schema.get("multipleOf", 1)
        step = step if isinstance(step, int) else 1
        n = self.rng.randint(int(lo), int(max(lo, hi)))
        return n - n % step if step > 1 and self.rng.random() < 0.8 else n

    def m_number(self, schema: dict[str, Any], depth: int) -> Any:
        lo, hi = self._range(schema)
        x = round(self.rng.uniform(lo, max(lo, hi)), 2)
        step = schema.get("multipleOf")
        if step and self.rng.random() < 0.8:
            x = round(x / step) * step
        return int(x) if self.rng.random() < 0.3 and x == int(x) else x

    def _range(self, schema: dict[str, Any]) -> tuple[float, float]:
        lo = max(v for v in (schema.get("minimum", -20), schema.get("exclusiveMinimum", -20)) if not isinstance(v, bool))
        hi = min(v for v in (schema.get("maximum", 20), schema.get("exclusiveMaximum", 20)) if not isinstance(v, bool))
        return lo, hi

    def m_array(self, schema: dict[str, Any], depth: int) -> Any:
        rng = self.rng
        prefix = schema.get("prefixItems") or (schema["items"] if isinstance(schema.get("items"), list) else [])
        items = schema.get("items", {}) if not isinstance(schema.get("items"), list) else schema.get("additionalItems", {})
        lo = schema.get("minItems", 0)
        n = rng.randint(lo, max(lo, min(schema.get("maxItems", lo + 3), lo + 3)))
        out = [self.make(prefix[i] if i < len(prefix) else items, depth - 1) for i in range(n)]
        if "contains" in schema and rng.random() < 0.8:
            for _ in range(schema.get("minContains", 1)):
                out.insert(rng.randint(0, len(out)), self.make(schema["contains"], depth - 1))
        return out

    def m_object(self, schema: dict[str, Any], depth: int) -> Any:
        rng = self.rng
        props = schema.get("properties", {})
        out = {}
        for key, sub in props.items():
            if key in schema.get("required", []) or rng.random() < 0.5:
                out[key] = self.make(sub, depth - 1)
        for _ in range(max(0, schema.get("minProperties", 0) - len(out)) + (rng.random() < 0.3)):
            key = rng.choice(KEYS)
            extra = schema.get("additionalProperties", {})
            sub = props.get(key, schema.get("patternProperties", {}).get("^x", {}) if key.startswith("x") else extra)
            out.setdefault(key, self.make(sub, depth - 1))
        return out


def mutate(doc: Any, rng: random.Random) -> Any:
    """One small change somewhere in a document: near the boundary of what the schema allows."""
    doc = copy.deepcopy(doc)
    if isinstance(doc, (dict, list)) and doc and rng.random() < 0.6:
        key = rng.choice(list(doc)) if isinstance(doc, dict) else rng.randrange(len(doc))
        r = rng.random()
        if r < 0.25:
            del doc[key]
        elif r < 0.4 and isinstance(doc, list):
            doc.append(copy.deepcopy(doc[key]))
        else:
            doc[key] = mutate(doc[key], rng)
        return doc
    r = rng.random()
    if isinstance(doc, dict) and r < 0.5:
        doc[rng.choice(KEYS)] = value(rng)
        return doc
    if isinstance(doc, list) and r < 0.5:
        doc.insert(rng.randint(0, len(doc)), value(rng))
        return doc
    if isinstance(doc, bool) or doc is None:
        return rng.choice([not doc, None, 0, "true"])
    if isinstance(doc, (int, float)):
        return rng.choice([doc + 1, doc - 1, doc + 0.5, -doc, doc * 10, float(doc), str(doc)])
    if isinstance(doc, str):
        return rng.choice([doc + "a", doc[:-1], doc.upper(), doc + "0", "", doc * 2, 1])
    return value(rng)

