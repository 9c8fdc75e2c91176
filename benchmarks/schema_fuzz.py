"""Seeded random JSON schemas through compile(), checked against `jsonschema` (the real validator).

    python benchmarks/schema_fuzz.py [--seed 0] [--count 500] [--minutes 0] [--timeout 20] [--workers 1]
                                     [--walks 6] [--out benchmarks/results/schema_fuzz.json]

Each schema (a seed and an index name it: `gen_schema(random.Random(f"{seed}:{i}"))`) mixes the
validation vocabulary we accept, nested a few levels: types, enum/const of scalars, objects and
arrays, numeric bounds (draft-04 boolean exclusives in draft-04 documents), multipleOf, string
length/pattern/format, items/prefixItems/contains/min/maxContains/uniqueItems, the object keywords,
allOf/anyOf/oneOf/not/if-then-else, `$ref` into `$defs` (recursion included). In a worker process
killed at the time limit (schema_coverage.py's pool), each is compiled: a refusal must be
UnsupportedSchemaError or GrammarCompileError (grouped by keyword), anything else is a crash. For a
compiled one, (a) seeded random walks over the token masks until an end token is allowed: every
finished text must parse and be valid (a soundness bug otherwise); (b) candidate instances, made to
be valid and mutated from those and from the walks, labelled by jsonschema and run token by token:
an invalid one accepted is a soundness bug; a valid one rejected is stricter output (documented
policy: this gives its rates): those accepted once integral floats are written as integers (`1.0`:
we write `1`) are counted apart, the rest against every keyword the schema uses. multipleOf is
judged on decimal texts (jsonschema divides binary floats: -0.7 is no multiple of 0.1 there); the
run counts where the two verdicts differ. Walks that reach a mask with no token allowed (dead ends,
a liveness bug, not a soundness one) are counted apart.
"""

from __future__ import annotations

import argparse
import collections
import importlib.util
import json
import random
import sys
import time
import traceback
from fractions import Fraction
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
_spec = importlib.util.spec_from_file_location("bench_schema_coverage", HERE / "schema_coverage.py")
_cov = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_cov)
_spec = importlib.util.spec_from_file_location("bench_schema_fuzz_gen", HERE / "schema_fuzz_gen.py")
_gen = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_gen)
Instances, gen_schema, mutate = _gen.Instances, _gen.gen_schema, _gen.mutate
VOCAB = {"type", "enum", "const", "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf",
         "minLength", "maxLength", "pattern", "format", "items", "prefixItems", "additionalItems", "contains",
         "minContains", "maxContains", "minItems", "maxItems", "uniqueItems", "properties", "required",
         "additionalProperties", "patternProperties", "propertyNames", "minProperties", "maxProperties",
         "dependentRequired", "dependentSchemas", "dependencies", "allOf", "anyOf", "oneOf", "not", "if",
         "then", "else", "$ref"}


def keywords(schema: Any, out: set[str] | None = None) -> set[str]:
    """The validation keywords a document uses anywhere (const/enum values are not walked)."""
    out = set() if out is None else out
    if isinstance(schema, list):
        for x in schema:
            keywords(x, out)
    elif isinstance(schema, dict):
        for k, v in schema.items():
            if k in VOCAB:
                out.add(k)
            if k in ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas"):
                for sub in v.values():
                    keywords(sub, out)
            elif k not in ("const", "enum", "required", "dependentRequired", "dependencies"):
                keywords(v, out)
    return out


class DeadEnd(AssertionError):
    """A mask with no token allowed, short of an accepting state: the walk cannot go on."""


def walk(grammar: Any, rng: random.Random, weights: Any, max_steps: int = 400) -> bytes | None:
    """Sample allowed tokens (seeded, weighted toward closing tokens) until an end token is allowed."""
    import numpy as np

    from radixlm import constrained as C

    info, m = grammar.info, grammar.matcher()
    bitmask, text = C.allocate_token_bitmask(1, info.vocab_size), bytearray()
    for _ in range(max_steps):
        m.fill_next_token_bitmask(bitmask, 0)
        bits = np.unpackbits(bitmask.numpy().view(np.uint8), bitorder="little")[: info.vocab_size]
        ids = np.flatnonzero(bits)
        if any(bits[t] for t in info.end_token_ids):
            if not m.is_accepting():
                raise AssertionError("end token allowed in a state that is not accepting")
            return bytes(text)
        if not len(ids):
            raise DeadEnd(bytes(text).decode("utf-8", "replace"))
        cum = np.cumsum(weights[ids])
        tid = int(ids[min(int(np.searchsorted(cum, rng.random() * cum[-1])), len(ids) - 1)])
        if not m.advance(tid):
            raise AssertionError(f"masked-in token {tid} refused after {bytes(text)!r}")
        text += info.token_bytes[tid]
    return None


def token_weights(info: Any) -> Any:
    """Short tokens and closing characters first, so walks end within the step budget."""
    import numpy as np

    w = np.ones(info.vocab_size)
    for tid, raw in enumerate(info.token_bytes[: info.vocab_size]):
        w[tid] = 0.0 if not raw else (8.0 if any(c in raw for c in b'"]},') else 1.0) / (1 + len(raw))
    return w


def _decimal_multiple_of(validator: Any, step: Any, instance: Any, schema: Any) -> Any:
    """multipleOf on the decimal texts, exactly (the specification's arithmetic): jsonschema divides binary
    floats, so -0.7 is no multiple of 0.1 there (-6.999999999999999)."""
    import jsonschema

    if validator.is_type(instance, "number") and Fraction(repr(instance)) % Fraction(repr(step)) != 0:
        yield jsonschema.ValidationError(f"{instance!r} is not a multiple of {step!r}")


def validator(schema: Any, decimal: bool = True) -> Any:
    """jsonschema's validator for the schema's draft, formats asserted; `decimal`: multipleOf exact."""
    import jsonschema

    cls = jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator)
    if decimal:
        cls = jsonschema.validators.extend(cls, {"multipleOf": _decimal_multiple_of})
    return cls(schema, format_checker=cls.FORMAT_CHECKER)


def _dup_keys(text: str) -> bool:
    seen = []
    json.loads(text, object_pairs_hook=lambda pairs: seen.append(len(pairs) != len({k for k, _ in pairs})) or {})
    return any(seen)


def _accepts(grammar: Any, tok: Any, text: str) -> bool:
    m = grammar.matcher()
    return all(m.advance(t) for t in _cov.encode(tok, text)) and m.is_accepting()


def _no_point_zero(doc: Any) -> Any:
    """The document with integral floats written as integers (1.0 -> 1): what our output does."""
    if isinstance(doc, float) and doc.is_integer() and abs(doc) < 1e15:
        return int(doc)
    if isinstance(doc, list):
        return [_no_point_zero(x) for x in doc]
    if isinstance(doc, dict):
        return {k: _no_point_zero(v) for k, v in doc.items()}
    return doc


def _satisfiable(schema: Any, rng: random.Random, tries: int = 12) -> bool:
    """Whether a generated instance is valid: a refusal of a schema some document satisfies is a
    coverage gap (the backend's "Unsatisfiable schema" ones should have none)."""
    made, judge = Instances(schema, rng), validator(schema)
    try:
        return any(judge.is_valid(made.make(schema)) for _ in range(tries))
    except RecursionError:  # a reference cycle on the same instance: jsonschema never ends either
        return False


def check(info: Any, tok: Any, name: str, walks: int = 6, candidates: int = 24) -> dict[str, Any]:
    """Compile one generated schema and check walks and candidates against jsonschema."""
    from radixlm import constrained as C

    rng = random.Random(name)
    schema = gen_schema(rng)
    row: dict[str, Any] = {"name": name, "keywords": sorted(keywords(schema))}
    t0 = time.perf_counter()
    try:
        grammar = C.compile(info, json_schema=schema, cache=None)
    except C.UnsupportedSchemaError as exc:
        return {**row, "status": "refused", "reason": exc.keyword, "path": exc.path,
                "satisfiable": _satisfiable(schema, rng)}
    except C.GrammarCompileError as exc:
        return {**row, "status": "refused", "reason": _cov._reason(exc), "path": "#",
                "satisfiable": _satisfiable(schema, rng)}
    except Exception:  # noqa: BLE001 -- any other exception is the bug this looks for
        return {**row, "status": "crash", "schema": schema, "error": traceback.format_exc(limit=4)[-1500:]}
    row.update(status="compiled", compile_s=time.perf_counter() - t0, walks=0, unfinished=0, walk_invalid=[],
               valid=0, invalid=0, invalid_accepted=[], valid_rejected=[], dead_ends=[], float_disagree=0,
               point_zero=0)
    check_doc, binary, texts = validator(schema), validator(schema, decimal=False), []
    try:
        weights = _STATE.get("weights")
        if weights is None:
            weights = _STATE["weights"] = token_weights(info)
        for _ in range(walks):
            try:
                data = walk(grammar, rng, weights)
            except DeadEnd as exc:
                row["dead_ends"].append(str(exc))
                continue
            if data is None:
                row["unfinished"] += 1
                continue
            row["walks"] += 1
            text = data.decode("utf-8")
            try:
                doc = json.loads(text)
            except ValueError:
                row["walk_invalid"].append({"text": text, "errors": ["not JSON"]})
                continue
            errors = [e.message[:200] for e in check_doc.iter_errors(doc)]
            if errors:
                row["walk_invalid"].append({"text": text, "errors": errors[:3], "dup_keys": _dup_keys(text)})
            texts.append(doc)
        made = Instances(schema, rng)
        docs = [made.make(schema) for _ in range(candidates // 3)]
        seeds = docs + texts
        docs += [mutate(rng.choice(seeds), rng) for _ in range(candidates - len(docs))] if seeds else []
        for doc in docs:
            try:
                text = json.dumps(doc, ensure_ascii=False)
            except ValueError:
                continue
            ok = check_doc.is_valid(doc)
            row["float_disagree"] += ok != binary.is_valid(doc)  # jsonschema's float multipleOf
            accepted = _accepts(grammar, tok, text)
            row["valid" if ok else "invalid"] += 1
            if accepted and not ok:
                row["invalid_accepted"].append(text)
            elif ok and not accepted:
                row["valid_rejected"].append(text)  # documented: integers are written without ".0"
                row["point_zero"] += _accepts(grammar, tok, json.dumps(_no_point_zero(doc), ensure_ascii=False))
    except Exception:  # noqa: BLE001 -- a matcher exception is a crash, with the schema to repeat it
        row.update(status="crash", error=traceback.format_exc(limit=4)[-1500:])
    if row["status"] == "crash" or row["walk_invalid"] or row["invalid_accepted"]:
        row["schema"] = schema
    return row


_STATE: dict[str, Any] = {}


def _worker(conn: Any, whitespace_max: int = 20) -> None:
    import jsonschema  # noqa: F401  (first use off the clock)

    from radixlm.constrained.vocab import TokenizerInfo

    tok, _ = _cov.load_tokenizer()
    info = TokenizerInfo.from_tokenizer(tok)
    _STATE["weights"] = token_weights(info)
    conn.send("ready")
    while True:
        job = conn.recv()
        if job is None:
            return
        conn.send(check(info, tok, job[1], _STATE["walks"] if "walks" in _STATE else 6))


def summarize(rows: list[dict[str, Any]]) -> dict[str, Any]:
    status = collections.Counter(r["status"] for r in rows)
    compiled = [r for r in rows if r["status"] == "compiled"]
    refused = collections.Counter(r["reason"] for r in rows if r["status"] == "refused")
    sat = collections.Counter(r["reason"] for r in rows if r["status"] == "refused" and r.get("satisfiable"))
    per_kw: dict[str, list[int]] = collections.defaultdict(lambda: [0, 0])
    for r in compiled:
        for kw in r["keywords"]:
            per_kw[kw][0] += r["valid"]
            per_kw[kw][1] += len(r["valid_rejected"]) - r["point_zero"]
    valid = sum(r["valid"] for r in compiled)
    rejected = sum(len(r["valid_rejected"]) for r in compiled)
    return {
        "schemas": len(rows), "compiled": status["compiled"], "refused": status["refused"],
        "timeouts": status["timeout"], "crashes": status["crash"], "refused_by_keyword": dict(refused.most_common()),
        "refused_satisfiable_by_keyword": dict(sat.most_common()),
        "walks_finished": sum(r["walks"] for r in compiled), "walks_unfinished": sum(r["unfinished"] for r in compiled),
        "walks_invalid": sum(len(r["walk_invalid"]) for r in compiled),
        "walks_dead_end": sum(len(r["dead_ends"]) for r in compiled),
        "schemas_with_dead_ends": sum(bool(r["dead_ends"]) for r in compiled),
        "float_multiple_of_disagreements": sum(r["float_disagree"] for r in compiled),
        "instances_valid": valid, "instances_invalid": sum(r["invalid"] for r in compiled),
        "invalid_accepted": sum(len(r["invalid_accepted"]) for r in compiled),
        "valid_rejected": rejected, "valid_rejected_rate": round(rejected / max(valid, 1), 4),
        "valid_rejected_point_zero": sum(r["point_zero"] for r in compiled),
        "valid_rejected_by_keyword": {k: {"valid": v, "rejected": n, "rate": round(n / max(v, 1), 3)}
                                      for k, (v, n) in sorted(per_kw.items(), key=lambda x: -x[1][1] / max(x[1][0], 1))},
        "compile_p50_ms": round(_cov.pct([r["compile_s"] for r in compiled], 0.5) * 1e3, 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--start", type=int, default=0, help="first schema index")
    ap.add_argument("--count", type=int, default=500, help="schemas (indices start .. start+count-1)")
    ap.add_argument("--timeout", type=float, default=20.0, help="seconds per schema (compile, walks, candidates)")
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--out", type=Path, default=HERE / "results" / "schema_fuzz.json")
    args = ap.parse_args()
    started = time.perf_counter()
    pool = _cov._Pool(args.workers, args.timeout, 20, target=_worker)
    rows = pool.run([("fuzz", f"{args.seed}:{i}") for i in range(args.start, args.start + args.count)])
    pool.close()
    for r in rows:
        if r["status"] == "timeout":
            r.update(name=r["file"], keywords=sorted(keywords(gen_schema(random.Random(r["file"])))))
    summary = summarize(rows)
    bad = [r for r in rows if r["status"] == "crash" or r.get("walk_invalid") or r.get("invalid_accepted")]
    report = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "command": " ".join([Path(sys.argv[0]).name] + sys.argv[1:]),
              "wall_s": round(time.perf_counter() - started, 1), "summary": summary, "bugs": bad,
              "timeouts": [r["name"] for r in rows if r["status"] == "timeout"],
              "dead_ends": [(r["name"], r["dead_ends"][0]) for r in rows if r.get("dead_ends")],
              "valid_rejected_examples": [(r["name"], r["valid_rejected"][:2]) for r in rows
                                          if r.get("valid_rejected")][:40]}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps(summary, indent=1))
    for r in bad:
        print("BUG", r["name"], r["status"], json.dumps(r.get("schema"))[:400], r.get("error", "")[-400:],
              r.get("walk_invalid", [])[:1], r.get("invalid_accepted", [])[:2])
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
