"""A request's JSON body: parsed and given the checks every route shares (a JSON object, nesting depth,
strings UTF-8 can carry), with every failure a 400 naming `body` or the field.

A body over `front_work.PROCESS_BYTES` is parsed in the front's child process (`parse_in_child`): `json.loads`
holds the GIL for its whole run on any thread (a 4-MB body of a million token ids held every other
client's request ~140 ms on the 2-core CPU), while unpickling the child's result costs the front a
fraction of it. This module imports nothing heavy: the child imports it.
"""
from __future__ import annotations

import json
from typing import Any

from radixlm.runtime.field_checks import MAX_DEPTH, check_depth, find_unencodable
from radixlm.runtime.sampling_params import InvalidRequestError
from radixlm.runtime.server.errors import ApiError


def parse_body(raw: bytes, allow_empty: bool = False) -> dict[str, Any]:
    """The body as a JSON object, or an ApiError (400) naming what is wrong."""
    if not raw.strip():
        if allow_empty:
            return {}
        raise ApiError(400, "body: empty; expected a JSON object", "body")
    try:
        body = json.loads(raw, parse_constant=_reject_constant)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ApiError(400, f"body: malformed JSON ({exc})", "body") from None
    except RecursionError:  # (the parser's own limit, near 1,000 levels)
        raise ApiError(400, f"body: nested more than {MAX_DEPTH} levels deep (objects and arrays)", "body") from None
    if not isinstance(body, dict):
        raise ApiError(400, "body: must be a JSON object", "body")
    try:
        check_depth(body)
    except InvalidRequestError as exc:
        raise ApiError.from_invalid(exc) from None
    where = find_unencodable(body)
    if where is not None:  # e.g. "\ud800" in a message: no tokenizer or response can carry it
        raise ApiError.bad_request(where, "contains a lone surrogate (invalid Unicode); send valid UTF-8 text")
    return body


def parse_in_child(raw: bytes, allow_empty: bool) -> tuple[str, Any]:
    """`parse_body` run in the child process: ("ok", body) or ("error", (status, message, param)) — an
    ApiError's own pickling would lose its status."""
    try:
        return "ok", parse_body(raw, allow_empty)
    except ApiError as exc:
        return "error", (exc.status, exc.message, exc.param)


def from_child(result: tuple[str, Any]) -> dict[str, Any]:
    kind, value = result
    if kind == "error":
        raise ApiError(*value)
    return value


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")
