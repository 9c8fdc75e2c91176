"""`uniqueItems` over open item sets, checked beside the grammar (schema.py leaves it to us).

The backend's grammar is compiled without those `uniqueItems` (unique_paths.py says where they
must hold, exactly); `UniqueMatcher` wraps its matcher with a `UniqueScan` of the accepted text.
`advance` refuses a token that completes an item equal to an earlier item of its array (the
backend matcher is rolled back), so no instance with a repeated item is ever accepted and every
other instance the grammar accepts still is. The mask is the backend's, minus every token that
`advance` would refuse: only tokens that can complete an item in the current lexical mode are
tried (tokens with a quote inside a string, ~160 of 49k; structural ones elsewhere), and inside
a string item a token whose closing quote ends the item is looked up by the item's text, not
scanned. Where at most LOOKAHEAD tokens other than whitespace are left, each is tried up to
LOOKAHEAD_DEPTH steps on and cleared if it leads only to rows with no token (a dead end the runtime
would fail with a 500). Between JSON tokens a row left with whitespace only is cleared too: that
whitespace only postpones the dead end (`_blank_only`), and the lookahead then sees it. Deeper
dead ends are left. While a unique array is open there is no jump-forward (`forced_bytes` is empty).
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from .base import Grammar, Matcher
from .unique_paths import UniquePaths
from .unique_scan import AFTER, COLON, KEY, LIT, NUM, NUMBER_BYTES, STR, VALUE, UniqueScan
from .vocab import TokenizerInfo

if TYPE_CHECKING:
    from .mask_workers import MaskWorkers

PAYLOAD_TAG = "unique-items"
LOOKAHEAD = 8  # tokens other than whitespace left in a row, at most, for the dead-end lookahead
LOOKAHEAD_DEPTH = 2  # steps on: a string item's opening quote, then its one-character items
LOOKAHEAD_PROBES = 24  # next rows (backend fills) per mask row, at most
_BETWEEN = (VALUE, KEY, AFTER, COLON)  # scan modes between JSON tokens: whitespace there is insignificant


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
        token_starts = all(bytes([b]) in singles for b in b'"{}[],:-0123456789tfn')
        tables = TokenTables((size + 31) // 32, ids(quoted), np.array(closes, dtype=bool), np.array(deep, dtype=bool),
                             by_before, ids(structural), ids(closings), ids(deep_closings), ids(literal), number_end,
                             blank, spaced, token_starts)
        _TABLES[info.fingerprint] = tables
        return tables


def _bits(words: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Mask bits of `ids` (int32 ids: the shift stays in int32)."""
    return (words[ids >> 5] >> (ids & 31)) & 1 != 0


def _clear(words: np.ndarray, bad: list[int]) -> None:
    """Clear the bits of `bad` in a mask row, in place."""
    ids = np.array(bad, dtype=np.int64)
    clear = np.zeros(words.shape[0], dtype=np.int64)
    np.bitwise_or.at(clear, ids >> 5, np.left_shift(1, ids & 31))
    words &= ~clear.astype(np.uint32).view(np.int32)


def _allowed(words: np.ndarray, vocab: int) -> np.ndarray:
    return np.unpackbits(words.view(np.uint8), bitorder="little")[:vocab].astype(bool)


class UniqueGrammar(Grammar):
    def __init__(self, inner: Grammar, paths: UniquePaths) -> None:
        self.inner, self.paths = inner, paths
        self.info, self.kind, self.spec, self.backend = inner.info, inner.kind, inner.spec, inner.backend
        self.tables = token_tables(inner.info)

    def matcher(self, family: int = 0) -> UniqueMatcher:
        return UniqueMatcher(self, self.inner.matcher(family), UniqueScan(self.paths), [])

    def prepare_families(self, count: int) -> None:
        self.inner.prepare_families(count)

    def payload(self) -> Any:
        return (PAYLOAD_TAG, self.inner.payload(), self.paths.payload())


class UniqueMatcher(Matcher):
    __slots__ = ("grammar", "inner", "scan", "history")

    def __init__(self, grammar: UniqueGrammar, inner: Matcher, scan: UniqueScan, history: list[Any]) -> None:
        self.grammar, self.inner, self.scan, self.history = grammar, inner, scan, history

    @property
    def num_tokens(self) -> int:
        return self.inner.num_tokens

    @property
    def family(self) -> int:
        return getattr(self.inner, "family", 0)

    def advance(self, token_id: int) -> bool:
        if not self.inner.advance(token_id):
            return False
        snap = self.scan.snapshot()
        data = self.grammar.info.token_bytes[token_id] if token_id < self.grammar.info.vocab_size else None
        if data and not self.scan.feed(data):
            self.scan.restore(snap)
            self.inner.rollback(1)
            return False
        self.history.append(snap)
        return True

    def rollback(self, n_tokens: int) -> None:
        self._check_rollback(n_tokens)
        if n_tokens:
            self.inner.rollback(n_tokens)
            self.scan.restore(self.history[-n_tokens])
            del self.history[-n_tokens:]

    def is_accepting(self) -> bool:
        return self.inner.is_accepting()

    def is_terminated(self) -> bool:
        return self.inner.is_terminated()

    def forced_bytes(self) -> bytes:
        return b"" if self.scan.watching() else self.inner.forced_bytes()

    def copy(self) -> UniqueMatcher:
        return UniqueMatcher(self.grammar, self.inner.copy(), self.scan.copy(), list(self.history))

    def fill_next_token_bitmask(self, bitmask: torch.Tensor, index: int = 0) -> None:
        self.inner.fill_next_token_bitmask(bitmask, index)
        self.remove_repeats(bitmask[index])

    @classmethod
    def prepare_fill(cls, items: Sequence[tuple[Matcher, int]], bitmask: torch.Tensor,
                     workers: MaskWorkers) -> Callable[[], None]:
        """The backend's rows as usual (its batch call), then our removals row by row."""
        inner = [(m.inner, i) for m, i in items]  # type: ignore[attr-defined]
        kinds: dict[type[Matcher], list[tuple[Matcher, int]]] = {}
        for m, i in inner:
            kinds.setdefault(type(m), []).append((m, i))
        jobs = [kind.prepare_fill(group, bitmask, workers) for kind, group in kinds.items()]

        def fill() -> None:
            for job in jobs:
                job()
            for m, i in items:
                m.remove_repeats(bitmask[i])  # type: ignore[attr-defined]

        return fill

    def remove_repeats(self, row: torch.Tensor) -> None:
        """Clear the bits of tokens that `advance` would refuse for completing a repeated item, then
        of tokens that lead only to a dead end within LOOKAHEAD_DEPTH steps, where few are left."""
        self._remove_repeats(row)
        self._remove_dead_ends(row, LOOKAHEAD_DEPTH, [LOOKAHEAD_PROBES])

    def _remove_dead_ends(self, row: torch.Tensor, depth: int, budget: list[int]) -> None:
        """A token whose next row, repeats and (depth - 1 steps on) dead ends removed, is empty
        while the text is not accepted leads only to a dead end (`["0","0` with items "0" and ""
        used: its one continuation `"` repeats an item), so clearing it loses no document. Tried
        only where at most LOOKAHEAD tokens are left that start with no whitespace (item sets of a
        few values), at most `budget` next rows in all (each one backend fill); past it, kept.
        Then, between JSON tokens, a row left with whitespace only is cleared (`_blank_only`)."""
        if not self.scan.watching() or self.inner.is_terminated():
            return
        t = self.grammar.tables
        words = row[: t.words].numpy()
        allowed = _allowed(words, self.grammar.info.vocab_size)
        spaced = allowed & t.spaced[: allowed.shape[0]]
        candidates = np.flatnonzero(allowed & ~t.blank[: allowed.shape[0]] & ~spaced)
        left = candidates.shape[0]
        if depth > 0 and 0 < left <= LOOKAHEAD:
            dead = []
            for tid in candidates.tolist():
                if budget[0] <= 0:
                    break
                budget[0] -= 1
                probe = self.copy()
                if not probe.advance(tid) or probe.is_accepting() or probe.inner.is_terminated():
                    continue
                scratch = torch.zeros((1, row.shape[0]), dtype=row.dtype)
                probe.inner.fill_next_token_bitmask(scratch, 0)
                probe._remove_repeats(scratch[0])
                probe._remove_dead_ends(scratch[0], depth - 1, budget)
                if not scratch[0, : t.words].any():
                    dead.append(tid)
            if dead:  # whitespace and then a dead token: the same step after a gap, dead too
                data = self.grammar.info.token_bytes
                ends = {data[tid] for tid in dead}
                _clear(words, dead + [tid for tid in np.flatnonzero(spaced).tolist()
                                      if data[tid].lstrip(b" \t\n\r") in ends])
                left -= len(dead)
        if not left and self._blank_only():
            words[:] = 0

    def _blank_only(self) -> bool:
        """With no token left that starts with no whitespace, is every whitespace token a dead end?
        Yes between JSON tokens (not in a string, number or literal) short of acceptance: there
        whitespace changes no state but the run's length, so a text that goes on after it goes on
        without it, and its first byte's token would be left in this row (a byte-level vocabulary;
        our removals are exact); none is, so none goes on, and the text cannot end here."""
        return self.grammar.tables.token_starts and self.scan.mode in _BETWEEN and not self.inner.is_accepting()

    def _remove_repeats(self, row: torch.Tensor) -> None:
        scan = self.scan
        if not scan.watching() or self.inner.is_terminated():
            return
        t = self.grammar.tables
        words = row[: t.words].numpy()
        if scan.mode == STR:
            on = _bits(words, t.quoted)
            item = scan.top_enforced() is not None and not scan.aux[0]
            keyed = scan.aux[0] and scan.paths.distinct_keys and bool(scan.keys_seen())
            prefix = scan.item_prefix() if item else scan.key_prefix() if keyed else None
            if scan.aux[2] or ((item or keyed) and prefix is None):  # an escape or a character pending: try every quote
                bad = [tid for tid in t.quoted[on].tolist() if not self._fits(tid)]
            else:
                closing = on & t.closes
                found: set[int] = set()
                if prefix is not None:  # the closing quote ends an item or a key: look its text up
                    cut = len(prefix)
                    for used in scan.top_enforced()[4] if item else scan.keys_seen():  # type: ignore[index]
                        if type(used) is str and used.startswith(prefix):
                            found.update(j for j in t.by_before.get(used[cut:], ()) if closing[j])
                bad = [int(t.quoted[j]) for j in found]
                gap = scan.enforced_gap()
                deep = closing & t.deep & (t.deep_closings >= (99 if gap is None else gap))
                bad += [tid for j, tid in zip(np.flatnonzero(deep).tolist(), t.quoted[deep].tolist())
                        if j not in found and not self._fits(tid)]
        elif scan.mode == LIT:  # the few tokens that go on with a literal
            candidates = np.flatnonzero(_allowed(words, self.grammar.info.vocab_size))
            bad = [tid for tid in candidates.tolist() if not self._fits(tid)]
        else:
            gap = scan.enforced_gap()  # an item ends at the enforced array only closing this many levels
            on = _bits(words, t.structural) & (t.closings >= (99 if gap is None else gap))
            candidates = t.structural[on]
            top = scan.top_enforced()
            if top is not None and any(type(x) is tuple and x[0] == "b" or x is None for x in top[4]):
                candidates = np.union1d(candidates, t.literal[_bits(words, t.literal)])
            bad = []
            if scan.mode == NUM and top is not None:  # a byte that ends the number ends the item
                if not scan.number_fits():
                    ends = _allowed(words, self.grammar.info.vocab_size) & t.number_end
                    bad = np.flatnonzero(ends).tolist()
                    candidates = np.setdiff1d(candidates, bad)
            bad += [tid for tid in candidates.tolist() if not self._fits(tid)]
        if bad:
            _clear(words, bad)

    def _fits(self, tid: int) -> bool:
        data = self.grammar.info.token_bytes[tid]
        if not data:
            return True
        snap = self.scan.snapshot()
        try:
            return self.scan.feed(data)
        finally:
            self.scan.restore(snap)


def from_payload(info: TokenizerInfo, payload: Any, rebuild: Callable[[Any], Grammar]) -> Grammar:
    _, inner, paths = payload
    return UniqueGrammar(rebuild(inner), UniquePaths.from_payload(paths))
