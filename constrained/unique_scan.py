"""A byte-level JSON scanner that remembers the items of arrays that must be unique.

It reads the text a grammar has already accepted (so it only has to interpret well-formed JSON
prefixes, not reject malformed ones), follows instance paths through `UniquePaths`, and keeps,
for each open array that must be unique, the items completed so far as canonical values
(JSON Schema equality: 1 == 1.0, true != 1, objects compared key by key). `feed` answers False
the moment a token completes an item equal to an earlier one of its array, or starts a literal
(`true` / `false` / `null`) that can only complete as such an item. State is a tuple of
immutable parts, so a snapshot per token makes rollback and trial scans cheap. Where
`paths.distinct_keys`, each open object's keys are kept too and a repeated key is refused the
same way (unique_keys.py says why).
"""

from __future__ import annotations

import json
from decimal import Decimal
from functools import lru_cache
from typing import Any

from .unique_paths import SINK, UniquePaths

# modes
VALUE, KEY, STR, NUM, LIT, AFTER, COLON = range(7)
_WS = frozenset(b" \t\n\r")
NUMBER_BYTES = frozenset(b"0123456789+-.eE")
_LITERALS = {ord("t"): (True, 3), ord("f"): (False, 4), ord("n"): (None, 3)}  # value, letters after the first
# frames: ("o", state, key, keys seen) / ("a", state, index, enforce, seen, item_start); an object's
# keys are kept only where it must repeat none (`paths.keys_checked`; else None)


def canonical(value: Any) -> Any:
    """A hashable form equal exactly when JSON Schema calls two instances equal (numbers are
    Decimals from the parser; booleans are tagged so that true != 1)."""
    kind = type(value)
    if kind is str or kind is Decimal or value is None:
        return value
    if kind is bool:
        return ("b", value)
    if kind is list:
        return ("a", tuple(canonical(v) for v in value))
    return ("o", frozenset((k, canonical(v)) for k, v in value.items()))


@lru_cache(maxsize=256)
def parse_item(raw: bytes) -> Any:
    """Cached: the trial scans of one mask complete the same item with several tokens."""
    return canonical(json.loads(raw.decode("utf-8", "replace"), parse_float=Decimal, parse_int=Decimal))


class UniqueScan:
    __slots__ = ("paths", "buf", "stack", "mode", "aux")

    def __init__(self, paths: UniquePaths) -> None:
        self.paths = paths
        self.buf = bytearray()
        self.stack: tuple[tuple[Any, ...], ...] = ()
        self.mode = VALUE
        self.aux: tuple[Any, ...] = ()  # STR: (is_key, start, escape); LIT: (letters left,)

    def snapshot(self) -> tuple[Any, ...]:
        return (len(self.buf), self.stack, self.mode, self.aux)

    def restore(self, snap: tuple[Any, ...]) -> None:
        del self.buf[snap[0]:]
        self.stack, self.mode, self.aux = snap[1], snap[2], snap[3]

    def copy(self) -> UniqueScan:
        other = UniqueScan(self.paths)
        other.buf = bytearray(self.buf)
        other.stack, other.mode, other.aux = self.stack, self.mode, self.aux
        return other

    def watching(self) -> bool:
        """Some open array must stay unique, or one may open below the current container."""
        stack = self.stack
        if self.paths.distinct_keys and not self.paths.distinct_at:
            return True
        if not stack:
            return self.paths.start != SINK
        return stack[-1][1] != SINK or any(f[0] == "a" and f[3] or f[0] == "o" and f[3] is not None for f in stack)

    def top_enforced(self) -> tuple[Any, ...] | None:
        top = self.stack[-1] if self.stack else None
        return top if top is not None and top[0] == "a" and top[3] else None

    def enforced_gap(self) -> int | None:
        """Levels from the innermost open container up to the innermost array kept unique."""
        for up, frame in enumerate(reversed(self.stack)):
            if frame[0] == "a" and frame[3]:
                return up
        return None

    def number_fits(self) -> bool:
        """In a number that is an item of a unique array: ending it here repeats no item."""
        top = self.stack[-1]
        try:
            return parse_item(bytes(self.buf[top[5]:])) not in top[4]
        except ValueError:  # "1." or "-": the grammar lets no byte end it here
            return True

    def item_prefix(self) -> str | None:
        """Inside a string that is an item of a unique array, with no escape pending and whole
        characters so far: its text so far (else None)."""
        if self.mode != STR or self.aux[0] or self.aux[2] or self.top_enforced() is None:
            return None
        try:
            return json.loads(bytes(self.buf[self.aux[1]:]) + b'"')
        except ValueError:  # a character split between tokens
            return None

    def key_prefix(self) -> str | None:
        """Inside a key whose object must not repeat one, with no escape pending and whole
        characters so far: the key's text so far (else None)."""
        if self.mode != STR or not self.aux[0] or self.aux[2] or not self.keys_seen():
            return None
        try:
            return json.loads(bytes(self.buf[self.aux[1]:]) + b'"')
        except ValueError:  # a character split between tokens
            return None

    def keys_seen(self) -> frozenset[str] | None:
        """The keys of the innermost open object so far, where it must repeat none (else None)."""
        top = self.stack[-1] if self.stack else None
        return top[3] if top is not None and top[0] == "o" else None

    def _child_state(self) -> int:
        if not self.stack:
            return self.paths.start
        top = self.stack[-1]
        if top[0] == "a":
            return self.paths.index_step(top[1], top[2])
        return self.paths.key_step(top[1], top[2]) if top[1] != SINK else SINK

    def _start_value(self, pos: int) -> None:
        top = self.stack[-1] if self.stack else None
        if top is not None and top[0] == "a" and top[3]:
            self.stack = self.stack[:-1] + (top[:5] + (pos,),)

    def _complete(self, end: int) -> bool:
        """A value ended at `end` (exclusive): an item of the top array, if it is one to keep unique."""
        top = self.stack[-1] if self.stack else None
        if top is None or top[0] != "a" or not top[3]:
            return True
        item = parse_item(bytes(self.buf[top[5]:end]))
        if item in top[4]:
            return False
        self.stack = self.stack[:-1] + (top[:4] + (top[4] | {item}, top[5]),)
        return True

    def _close(self, end: int) -> bool:
        self.stack = self.stack[:-1]
        self.mode = AFTER
        return self._complete(end)

    def feed(self, data: bytes) -> bool:
        """Scan `data` (appended to the text); False when it completes or forces a duplicate item."""
        base = len(self.buf)
        self.buf += data
        buf = self.buf
        i, n = base, len(buf)
        while i < n:
            mode, b = self.mode, buf[i]
            if mode == STR:
                is_key, start, esc = self.aux
                if esc:
                    esc = 4 if esc == 1 and b == 0x75 else (0 if esc == 1 else esc - 1)  # \uXXXX: 4 more
                    self.aux = (is_key, start, esc)
                elif b == 0x5C:
                    self.aux = (is_key, start, 1)
                elif b == 0x22:
                    if is_key:
                        top = self.stack[-1]
                        seen = top[3]
                        key = json.loads(bytes(buf[start:i + 1]).decode("utf-8", "replace")) \
                            if top[1] != SINK or seen is not None else ""
                        if seen is not None:
                            if key in seen:
                                return False  # a repeated key: the parsed object would hold one
                            seen = seen | {key}
                        self.stack = self.stack[:-1] + (("o", top[1], key, seen),)
                        self.mode = COLON
                    else:
                        self.mode = AFTER
                        if not self._complete(i + 1):
                            return False
                else:  # plain characters: skip to the next quote or backslash
                    q, s = buf.find(b'"', i, n), buf.find(b"\\", i, n)
                    nxt = min(x for x in (q, s, n) if x >= 0)
                    i = nxt
                    continue
            elif mode == NUM:
                if b not in NUMBER_BYTES:
                    self.mode = AFTER
                    if not self._complete(i):
                        return False
                    continue  # the byte is read again after the number
            elif mode == LIT:
                left = self.aux[0] - 1
                self.aux = (left,)
                if not left:
                    self.mode = AFTER
                    if not self._complete(i + 1):
                        return False
            elif b in _WS:
                pass
            elif mode == VALUE or mode == KEY:
                if b == 0x22:
                    if mode == VALUE:
                        self._start_value(i)
                    self.mode, self.aux = STR, (mode == KEY, i, 0)
                elif b == 0x5D or b == 0x7D:  # empty array / object
                    if not self._close(i + 1):
                        return False
                elif b == 0x7B or b == 0x5B:
                    self._start_value(i)
                    state = self._child_state()
                    if b == 0x7B:
                        self.stack += (("o", state, None, frozenset() if self.paths.keys_checked(state) else None),)
                        self.mode = KEY
                    else:
                        self.stack += (("a", state, 0, state != SINK and self.paths.enforce[state], frozenset(), i),)
                        self.mode = VALUE
                elif b in _LITERALS:
                    self._start_value(i)
                    value, left = _LITERALS[b]
                    top = self.top_enforced()
                    if top is not None and (value if value is None else ("b", value)) in top[4]:
                        return False  # it can only end as a repeat
                    self.mode, self.aux = LIT, (left,)
                else:
                    self._start_value(i)
                    self.mode = NUM
            elif mode == COLON:
                self.mode = VALUE  # b == ':'
            else:  # AFTER
                if b == 0x2C:
                    top = self.stack[-1]
                    if top[0] == "a":
                        self.stack = self.stack[:-1] + (top[:2] + (top[2] + 1,) + top[3:],)
                        self.mode = VALUE
                    else:
                        self.mode = KEY
                elif b == 0x5D or b == 0x7D:
                    if not self._close(i + 1):
                        return False
            i += 1
        return True
