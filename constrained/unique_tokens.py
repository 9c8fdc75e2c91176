"""Per tokenizer, which tokens can end a JSON value or an item, for the run-time unique check.

unique_check.py tries only tokens that can complete an item (or a key) in the scan's lexical
mode: those with an unescaped quote inside a string, structural ones and literal starts outside
one. These tables, built once per tokenizer, say which tokens those are, and how many containers
a token closes; the bit helpers read and clear mask rows.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from .unique_scan import NUMBER_BYTES
from .vocab import TokenizerInfo


def _json_bytes(data: bytes, in_string: bool = False) -> Iterator[tuple[int, int, bool]]:
    """(index, byte, closes) for each byte of `data` read outside a string (an opening quote
    included), and for each unescaped quote that closes a string (closes=True); the strings'
    bodies, escapes included, are skipped. `in_string`: `data` begins inside a string."""
    esc = False
    for i, b in enumerate(data):
        if in_string:
            if esc:
                esc = False
            elif b == 0x5C:
                esc = True
            elif b == 0x22:
                in_string = False
                yield i, b, True
            continue
        if b == 0x22:
            in_string = True
        yield i, b, False


def _closing_quote(data: bytes) -> int:
    """Index of the first unescaped quote of `data` read inside a string, or -1."""
    return next((i for i, _, closes in _json_bytes(data, in_string=True) if closes), -1)


def _ends_outside(data: bytes) -> bool:
    """Read outside a string, can `data` end a value: close a string it opens, close a
    container, end a number it starts (or one before it: `number_end`), or hold a whole
    literal? A superset (the scan decides); literal starts are `_literal_start`."""
    in_num = False
    for i, b, closes in _json_bytes(data):
        if closes or (in_num and b not in NUMBER_BYTES):
            return True
        if b != 0x22 and (b in b"]}" or data.startswith((b"true", b"false", b"null"), i)):
            return True
        in_num = in_num and b in NUMBER_BYTES or (b in b"-0123456789")
    return False


def _closings(data: bytes) -> int:
    """Read outside a string: how many containers open before `data` it closes at most (an
    item of the array that many levels up can end), or 99 when it opens one and may end two of
    its items (a `,` after the `[` or `{`)."""
    opened = False
    depth = low = 0
    for _, b, closes in _json_bytes(data):
        if closes or b == 0x22:
            continue
        if b in b"[{":
            depth, opened = depth + 1, True
        elif b in b"]}":
            depth -= 1
            low = min(low, depth)
        elif b == 0x2C and opened:
            return 99
    return -low


def _literal_start(data: bytes) -> bool:
    """Can `data`, read outside a string, start a literal (t / f / n at a value's place)?"""
    at_value = True
    for b in data:
        if b in b" \t\n\r":
            continue
        if at_value and b in b"tfn":
            return True
        at_value = b in b"[,:"
    return False


@dataclass(frozen=True)
class TokenTables:
    """Per tokenizer: which tokens can end an item in each lexical mode."""

    words: int                   # int32 words of a mask row
    quoted: np.ndarray           # ids of tokens with a quote
    closes: np.ndarray           # per quoted token: it has an unescaped quote (read inside a string)
    deep: np.ndarray             # per quoted token: it closes and more may end after that quote, or the
                                 # text before the quote does not decode alone
    by_before: dict[str, list[int]]  # the text before that quote -> positions in `quoted`
    structural: np.ndarray       # ids that may end a value read outside a string
    closings: np.ndarray         # per structural token: _closings
    deep_closings: np.ndarray    # per quoted token: _closings of what follows its closing quote
    literal: np.ndarray          # ids that may start a literal
    number_end: np.ndarray       # bool per id: its first byte ends a number
    blank: np.ndarray            # bool per id: no bytes, or whitespace only (never enters a dead end alone)
    spaced: np.ndarray           # bool per id: whitespace, then more (the same step as the rest, after a gap)
    token_starts: bool           # each byte a JSON token starts with is a token alone (`_blank_only`)
    solid_words: np.ndarray      # as mask words: neither blank nor spaced (what a row's lookahead tries)
    spaced_words: np.ndarray     # as mask words: spaced
    nonblank_words: np.ndarray   # as mask words: not blank
    closing_words: np.ndarray    # as mask words: an unescaped quote when read inside a string
    ws_words: np.ndarray         # as mask words: whitespace only (not empty)
    space: int                   # the token " " alone (-1: none): the gap that ends a number, probed
    space_id: np.ndarray         # [space] as an id array, for row_bits


_TABLES: dict[str, TokenTables] = {}
_LOCK = threading.Lock()


def token_tables(info: TokenizerInfo) -> TokenTables:
    with _LOCK:
        hit = _TABLES.get(info.fingerprint)
        if hit is not None:
            return hit
        size = info.vocab_size
        number_end = np.zeros(size, dtype=bool)
        blank = np.ones(size, dtype=bool)
        spaced = np.zeros(size, dtype=bool)
        structural, literal, quoted, closes, deep, closings, deep_closings = [], [], [], [], [], [], []
        by_before: dict[str, list[int]] = {}
        for tid, data in enumerate(info.token_bytes):
            if not data:
                continue
            blank[tid] = not data.strip(b" \t\n\r")
            spaced[tid] = not blank[tid] and data[0] in b" \t\n\r"
            if _ends_outside(data):
                structural.append(tid)
                closings.append(_closings(data))
            if _literal_start(data):
                literal.append(tid)
            number_end[tid] = data[0] not in NUMBER_BYTES
            if b'"' in data:
                at = _closing_quote(data)
                text: str | None = None
                if at >= 0:
                    try:
                        text = json.loads(b'"' + data[:at] + b'"')
                    except ValueError:
                        text = None
                if text is not None:
                    by_before.setdefault(text, []).append(len(quoted))
                quoted.append(tid)
                closes.append(at >= 0)
                deep_closings.append(_closings(data[at + 1:]) if at >= 0 else 0)
                deep.append(at >= 0 and (text is None or _ends_outside(data[at + 1:]) or _literal_start(data[at + 1:])))
        ids = lambda xs: np.array(xs, dtype=np.int32)  # noqa: E731
        singles = {data for data in info.token_bytes if data and len(data) == 1}
        has_bytes = np.array([bool(data) for data in info.token_bytes[:size]] + [False] * (size - len(info.token_bytes)),
                             dtype=bool)[:size]
        space = next((tid for tid, data in enumerate(info.token_bytes[:size]) if data == b" "), -1)
        token_starts = all(bytes([b]) in singles for b in b'"{}[],:-0123456789tfn')
        tables = TokenTables((size + 31) // 32, ids(quoted), np.array(closes, dtype=bool), np.array(deep, dtype=bool),
                             by_before, ids(structural), ids(closings), ids(deep_closings), ids(literal), number_end,
                             blank, spaced, token_starts, _as_words(~blank & ~spaced, size), _as_words(spaced, size),
                             _as_words(~blank, size), _as_words(_marked(size, ids(quoted)[np.array(closes, dtype=bool)]), size),
                             _as_words(blank & has_bytes, size), space, ids([max(space, 0)]))
        _TABLES[info.fingerprint] = tables
        return tables


def _marked(size: int, ids: np.ndarray) -> np.ndarray:
    bits = np.zeros(size, dtype=bool)
    bits[ids] = True
    return bits


def _as_words(bits: np.ndarray, size: int) -> np.ndarray:
    padded = np.zeros(((size + 31) // 32) * 32, dtype=bool)
    padded[:size] = bits
    return np.packbits(padded, bitorder="little").view(np.int32)


def ids_of(words: np.ndarray) -> np.ndarray:
    """The token ids whose bits are set in mask words (only the nonzero words unpacked)."""
    nz = np.flatnonzero(words)
    bits = np.unpackbits(words[nz].view(np.uint8), bitorder="little").reshape(-1, 32)
    row, col = np.nonzero(bits)
    return nz[row] * 32 + col


def row_bits(words: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Mask bits of `ids` (int32 ids: the shift stays in int32)."""
    return (words[ids >> 5] >> (ids & 31)) & 1 != 0


def clear_bits(words: np.ndarray, bad: list[int]) -> None:
    """Clear the bits of `bad` in a mask row, in place."""
    ids = np.array(bad, dtype=np.int64)
    clear = np.zeros(words.shape[0], dtype=np.int64)
    np.bitwise_or.at(clear, ids >> 5, np.left_shift(1, ids & 31))
    words &= ~clear.astype(np.uint32).view(np.int32)


def allowed_mask(words: np.ndarray, vocab: int) -> np.ndarray:
    return np.unpackbits(words.view(np.uint8), bitorder="little")[:vocab].astype(bool)
