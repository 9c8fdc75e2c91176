"""Which listed items an item of a unique array can still become: dead ends seen from the items.

Where a unique array's items are listed (an `enum`/`const` on the item schema, unique_paths.py
keeps them per array state), an item being written can only end as one of them, and a repeated
one is refused (unique_check.py). So once the text of the item so far can become none of the
listed values not used yet — or the array must take one more item (after a `,`) and every value is
used — no document goes on from here: a dead end, however many steps away the grammar runs out of
tokens (`[["xyz"],` with `["xyz"]` the only item: five tokens on). `can_become` matches the
text against a value loosely (any whitespace, object keys in any order, a number's spelling
left open), so it may say yes where the grammar says no, never the other way: a state it calls
dead is dead, and masking it loses no document.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .unique_scan import UniqueScan

_WS = " \t\n\r"
PARTIAL, DONE, FAIL = 0, 1, 2
_NUMBER = frozenset("0123456789+-.eE")
_MEMO = 4096  # (array state, items used, item text) -> alive, per grammar


def _skip(text: str, i: int) -> int:
    while i < len(text) and text[i] in _WS:
        i += 1
    return i


def _string(text: str, i: int) -> tuple[int, Any, int]:
    """At a quote: (DONE, the decoded string, end) / (PARTIAL, the prefix or None, len) / FAIL."""
    j, esc = i + 1, False
    while j < len(text):
        c = text[j]
        if esc:
            esc = False
        elif c == "\\":
            esc = True
        elif c == '"':
            try:
                return DONE, json.loads(text[i:j + 1]), j + 1
            except ValueError:
                return FAIL, None, j + 1
        j += 1
    try:
        return PARTIAL, json.loads(text[i:] + '"'), len(text)
    except ValueError:  # an escape split: any prefix
        return PARTIAL, None, len(text)


def match(text: str, i: int, value: Any) -> tuple[int, int]:
    """(verdict, end): can text[i:] (whitespace first allowed) be the start of `value`, or all of it?"""
    i = _skip(text, i)
    if i == len(text):
        return PARTIAL, i
    c = text[i]
    if value is None or type(value) is bool:
        word = "null" if value is None else "true" if value else "false"
        rest = text[i:i + len(word)]
        if not word.startswith(rest):
            return FAIL, i
        return (DONE, i + len(word)) if len(rest) == len(word) else (PARTIAL, len(text))
    if isinstance(value, (int, float)):
        j = i
        while j < len(text) and text[j] in _NUMBER:
            j += 1
        if j == i:
            return FAIL, i
        if j == len(text):
            return PARTIAL, j  # a number's spelling left open (1, 1.0, 10e-1 ...)
        try:
            return (DONE, j) if json.loads(text[i:j]) == value else (FAIL, j)
        except ValueError:
            return FAIL, j
    if isinstance(value, str):
        if c != '"':
            return FAIL, i
        verdict, got, end = _string(text, i)
        if verdict == PARTIAL:
            return (PARTIAL, end) if got is None or value.startswith(got) else (FAIL, end)
        return (DONE, end) if verdict == DONE and got == value else (FAIL, end)
    if isinstance(value, list):
        return _array(text, i, value) if c == "[" else (FAIL, i)
    if isinstance(value, dict):
        return _object(text, i, value) if c == "{" else (FAIL, i)
    return PARTIAL, len(text)  # not a JSON value: say nothing


def _array(text: str, i: int, value: list[Any]) -> tuple[int, int]:
    i += 1
    for k, item in enumerate(value):
        i = _skip(text, i)
        if i == len(text):
            return PARTIAL, i
        if k:
            if text[i] != ",":
                return FAIL, i
            i += 1
        verdict, i = match(text, i, item)
        if verdict != DONE:
            return verdict, i
    i = _skip(text, i)
    if i == len(text):
        return PARTIAL, i
    return (DONE, i + 1) if text[i] == "]" else (FAIL, i)


def _object(text: str, i: int, value: dict[str, Any]) -> tuple[int, int]:
    i, seen = i + 1, set()
    while True:
        i = _skip(text, i)
        if i == len(text):
            return PARTIAL, i
        if text[i] == "}":
            return (DONE, i + 1) if len(seen) == len(value) else (FAIL, i)
        if seen:
            if text[i] != ",":
                return FAIL, i
            i = _skip(text, i + 1)
            if i == len(text):
                return PARTIAL, i
        if text[i] != '"':
            return FAIL, i
        verdict, key, i = _string(text, i)
        left = [k for k in value if k not in seen]
        if verdict == PARTIAL:
            return (PARTIAL, i) if key is None or any(k.startswith(key) for k in left) else (FAIL, i)
        if verdict == FAIL or key not in left:
            return FAIL, i
        seen.add(key)
        i = _skip(text, i)
        if i == len(text):
            return PARTIAL, i
        if text[i] != ":":
            return FAIL, i
        verdict, i = match(text, i + 1, value[key])
        if verdict != DONE:
            return verdict, i


def can_become(text: str, value: Any) -> bool:
    """Can the item text so far (whole or a prefix) be written on into `value`?"""
    verdict, end = match(text, 0, value)
    return verdict == PARTIAL or verdict == DONE and not text[end:].strip(_WS)


def items_left(scan: UniqueScan) -> bool:
    """False when an open unique array with listed items is at a dead end: its item so far can
    become no listed value not used yet, or it must take another item (after a `,`) and none is
    left. True where that cannot be told (items not listed, an item not begun, a split character)."""
    from .unique_scan import AFTER, VALUE

    listed = scan.paths.item_values
    if not listed:
        return True
    stack = scan.stack
    for depth, frame in enumerate(stack):
        if frame[0] != "a" or not frame[3] or listed[frame[1]] is None:
            continue
        unused = [v for v, key in listed[frame[1]] if key not in frame[4]]
        top = depth == len(stack) - 1
        if top and scan.mode == AFTER or top and scan.mode == VALUE and frame[2] == 0:
            continue  # an item just ended, or the array may close empty: the grammar's call
        if top and scan.mode == VALUE:
            if not unused:
                return False
            continue
        raw = bytes(scan.buf[frame[5]:])
        memo = scan.paths.alive
        key = (frame[1], frame[4], raw)
        alive = memo.get(key)
        if alive is None:
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:  # a character split between tokens
                continue
            alive = any(can_become(text, v) for v in unused)
            if len(memo) >= _MEMO:
                memo.clear()
            memo[key] = alive
        if not alive:
            return False
    return True


def keys_left(scan: UniqueScan) -> bool:
    """False when the innermost object keeps its keys distinct, its names are listed
    (unique_keys.key_names), and the key it must take (after a `,`) or is writing can be none
    of those not used yet."""
    from .unique_scan import KEY, STR

    names = scan.paths.key_names
    top = scan.stack[-1] if names and scan.stack else None
    if top is None or top[0] != "o" or not top[3] or top[1] < 0 or names[top[1]] is None:
        return True
    unused = [k for k in names[top[1]] if k not in top[3]]
    if scan.mode == KEY:
        return bool(unused)
    if scan.mode == STR and scan.aux[0] and not scan.aux[2]:
        try:
            prefix = json.loads(bytes(scan.buf[scan.aux[1]:]) + b'"')
        except ValueError:  # a character split between tokens
            return True
        return any(k.startswith(prefix) for k in unused)
    return True


def fewest_left(scan: UniqueScan) -> int | None:
    """The fewest listed values (or names) not used yet over the open unique arrays with listed
    items and the innermost object with listed names (None where none is open): dead ends come
    where few are left, so only there is each token tried."""
    listed, names = scan.paths.item_values, scan.paths.key_names
    counts = [sum(key not in f[4] for _, key in listed[f[1]]) for f in scan.stack
              if f[0] == "a" and f[3] and listed and listed[f[1]] is not None]
    top = scan.stack[-1] if names and scan.stack else None
    if top is not None and top[0] == "o" and top[3] is not None and top[1] >= 0 and names[top[1]] is not None:
        counts.append(sum(k not in top[3] for k in names[top[1]]))
    return min(counts) if counts else None


def dead_here(scan: UniqueScan) -> bool:
    """No document goes on from this state: no listed item, or no listed name, is left for it."""
    return not items_left(scan) or not keys_left(scan)
