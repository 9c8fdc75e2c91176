"""Constrained generation end to end: JSON-schema requests through the Engine, and the same prompts
unconstrained in the same run, so the cost of the grammar is a ratio measured side by side.

Counts as valid: output that parses as JSON and has every required property of its schema.
"""
from __future__ import annotations

import asyncio
import json
import time
from typing import Any

from radixlm.runtime.bench.report import summary_table

SCHEMAS: list[tuple[str, dict[str, Any]]] = [
    ("a person", {"type": "object", "properties": {
        "name": {"type": "string", "maxLength": 40}, "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "email": {"type": "string", "format": "email"}}, "required": ["name", "age"], "additionalProperties": False}),
    ("an order", {"type": "object", "properties": {
        "id": {"type": "integer"}, "status": {"enum": ["pending", "shipped", "delivered"]},
        "items": {"type": "array", "minItems": 1, "maxItems": 4, "items": {"type": "object", "properties": {
            "sku": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{4}$"}, "qty": {"type": "integer", "minimum": 1}},
            "required": ["sku", "qty"], "additionalProperties": False}}},
        "required": ["id", "status", "items"], "additionalProperties": False}),
    ("a city", {"type": "object", "properties": {
        "city": {"type": "string", "maxLength": 30}, "country": {"type": "string", "maxLength": 30},
        "population": {"type": "integer", "minimum": 0}, "coastal": {"type": "boolean"}},
        "required": ["city", "country", "population", "coastal"], "additionalProperties": False}),
]


def make_requests(engine: Any, n: int) -> list[tuple[str, dict[str, Any]]]:
    out = []
    for i in range(n):
        what, schema = SCHEMAS[i % len(SCHEMAS)]
        messages = [{"role": "user", "content": f"Describe {what} (example {i}) as JSON."}]
        prompt = engine.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        out.append((prompt, schema))
    return out


def _is_valid(text: str, schema: dict[str, Any]) -> bool:
    try:
        value = json.loads(text)
    except ValueError:
        return False
    return isinstance(value, dict) and all(key in value for key in schema.get("required", []))


def run(engine: Any, requests: list[tuple[str, dict[str, Any]]], max_new_tokens: int,
        constrained: bool, progress: bool = True) -> dict[str, Any]:
    from tqdm.auto import tqdm

    prompts = [p for p, _ in requests]
    params = [{"temperature": 0, "max_new_tokens": max_new_tokens,
               **({"json_schema": json.dumps(schema)} if constrained else {})} for _, schema in requests]
    desc = "constrained" if constrained else "unconstrained"

    async def all_requests() -> list[dict[str, Any]]:
        # Every request in flight at once (like a batch); the bar moves as requests finish.
        with tqdm(total=len(prompts), desc=desc, unit="req", disable=not progress) as bar:
            async def one(prompt: str, p: dict[str, Any]) -> dict[str, Any]:
                out = await engine.async_generate(prompt, p)
                bar.update(1)
                return out

            return await asyncio.gather(*(one(prompt, p) for prompt, p in zip(prompts, params)))

    start = time.perf_counter()
    outs = asyncio.run(all_requests())
    elapsed = time.perf_counter() - start
    tokens = sum(o["meta_info"]["completion_tokens"] for o in outs)
    valid = sum(_is_valid(o["text"], schema) for o, (_, schema) in zip(outs, requests))
    return {"requests": len(outs), "duration_s": elapsed, "output_tokens": tokens,
            "request_throughput": len(outs) / elapsed, "output_throughput": tokens / elapsed,
            "valid_json": valid, "errors": sum(o["meta_info"]["finish_reason"].get("type") == "abort" for o in outs)}


def constrained_table(c: dict[str, Any], u: dict[str, Any] | None, backend: str) -> str:
    sections = [(None, [("Backend", f"radixlm Engine, grammar {backend}"), ("Requests", c["requests"]),
                        ("Benchmark duration (s)", c["duration_s"]), ("Total generated tokens", c["output_tokens"]),
                        ("Request throughput (req/s)", c["request_throughput"]),
                        ("Output token throughput (tok/s)", c["output_throughput"]),
                        ("Valid JSON outputs", f"{c['valid_json']} / {c['requests']}"),
                        ("Failed requests", c["errors"])])]
    if u is not None:
        sections.append(("Same prompts, unconstrained", [
            ("Output token throughput (tok/s)", u["output_throughput"]),
            ("Constrained / unconstrained tok/s", c["output_throughput"] / max(u["output_throughput"], 1e-9))]))
    return summary_table("Constrained Generation Benchmark Result", sections)
