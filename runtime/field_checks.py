"""Checks every request parser shares: field paths in one style (`messages[2].content`), strings
that cannot be encoded (lone surrogates), finite numbers in range, and unknown fields, which are
ignored with a log warning (as SGLang and vLLM do) while known fields are validated."""
from __future__ import annotations

import logging
import math
from collections.abc import Iterable
from typing import Any

from radixlm.runtime.sampling_params import InvalidRequestError

logger = logging.getLogger("radixlm.request")

# The largest integer any count or id may take: beyond int64 nothing downstream can hold it.
MAX_INT = 2**63 - 1
# The deepest nesting of objects and arrays a request may have. Python's JSON parser gives up near 1,000
# levels with a RecursionError, and what reads a request after it recurses too: a tool's or
# response_format's schema ~100 object levels deep exhausted the stack of the metaschema check (a 500).
# 128 leaves a schema ~60 object levels, several times any real one.
MAX_DEPTH = 128


def field_path(parent: str, key: str | int) -> str:
    """`parent.key` or `parent[i]`; a top-level field is just its name."""
    if isinstance(key, int):
        return f"{parent}[{key}]"
    return f"{parent}.{key}" if parent else key


def find_unencodable(value: Any, path: str = "") -> str | None:
    """The path of the first string (key or value) holding a lone surrogate, which no UTF-8 text
    can carry: JSON's `\\ud800` escape decodes to one. None if there is none."""
    stack: list[tuple[Any, str]] = [(value, path)]
    while stack:
        item, where = stack.pop()
        if isinstance(item, str):
            if not _encodable(item):
                return where or "body"
        elif isinstance(item, dict):
            for k, v in item.items():
                sub = field_path(where, str(k))
                if isinstance(k, str) and not _encodable(k):
                    return sub
                stack.append((v, sub))
        elif isinstance(item, list) and not _SCALAR_TYPES.issuperset(map(type, item)):
            # (a list of numbers — token ids — holds no text: skipped at C speed; a 512 x 1,088-token batch
            # took ~0.6 s of the Engine's time walked id by id)
            stack.extend((v, field_path(where, i)) for i, v in enumerate(item))
    return None


_SCALAR_TYPES = frozenset({int, float, bool, type(None)})


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def find_too_deep(value: Any, path: str = "", limit: int = MAX_DEPTH) -> str | None:
    """The path of the first object or array nested more than `limit` levels deep, or None. Iterative:
    a value too deep for the recursive readers after it must not exhaust the stack here."""
    stack: list[tuple[Any, str, int]] = [(value, path, 0)]
    while stack:
        item, where, depth = stack.pop()
        if isinstance(item, dict):
            children = item.items()
        elif isinstance(item, list) and not _SCALAR_TYPES.issuperset(map(type, item)):
            children = enumerate(item)
        elif isinstance(item, list):  # (numbers only: one level, checked at C speed)
            children = ()
        else:
            continue
        if depth + 1 > limit:
            return where or "body"
        stack.extend((v, field_path(where, k if isinstance(k, int) else str(k)), depth + 1) for k, v in children)
    return None


def check_depth(value: Any, path: str = "", limit: int = MAX_DEPTH) -> None:
    where = find_too_deep(value, path, limit)
    if where is not None:
        where = where if len(where) <= 120 else where[:117] + "..."
        raise InvalidRequestError(where, f"is nested more than {limit} levels deep (objects and arrays)")


def check_encodable(value: Any, path: str = "") -> None:
    where = find_unencodable(value, path)
    if where is not None:
        raise InvalidRequestError(where, "contains a lone surrogate (invalid Unicode); send valid UTF-8 text")


def ignore_unknown(where: str, body: dict[str, Any], known: Iterable[str]) -> list[str]:
    """Log (once per request) and return the fields of `body` this server does not know."""
    allowed = known if isinstance(known, (set, frozenset, dict)) else set(known)
    unknown = [str(k) for k in body if k not in allowed]
    if unknown:
        names = ", ".join(field_path(where, k) for k in unknown[:10])
        logger.warning("ignoring unknown request field(s): %s", names)
    return unknown


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    """A finite JSON number (1e400 parses as inf; NaN never compares)."""
    return (isinstance(value, (int, float)) and not isinstance(value, bool)
            and (isinstance(value, int) or math.isfinite(value)))


def require_int(value: Any, name: str, lo: int | None = None, hi: int | None = MAX_INT) -> int:
    """An integer (an integral float such as 2.0 is taken) within [lo, hi]."""
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        value = int(value)
    if not is_int(value):
        raise InvalidRequestError(name, "must be an integer")
    return _in_range(value, name, lo, hi)


def require_number(value: Any, name: str, lo: float | None = None, hi: float | None = None) -> float:
    if not is_number(value):
        raise InvalidRequestError(name, "must be a finite number")
    return float(_in_range(value, name, lo, hi))


def _in_range(value: Any, name: str, lo: float | None, hi: float | None) -> Any:
    if lo is not None and value < lo:
        raise InvalidRequestError(name, f"must be >= {lo}, got {value}")
    if hi is not None and value > hi:
        raise InvalidRequestError(name, f"must be <= {hi}, got {value}")
    return value


def require_bool(value: Any, name: str) -> bool:
    if not isinstance(value, bool):
        raise InvalidRequestError(name, "must be a boolean")
    return value


def require_str(value: Any, name: str) -> str:
    if not isinstance(value, str):
        raise InvalidRequestError(name, "must be a string")
    return value
