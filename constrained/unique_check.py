"""`uniqueItems` over open item sets, checked beside the grammar (schema.py leaves it to us).

The backend's grammar is compiled without those `uniqueItems` (unique_paths.py says where they
must hold, exactly); `UniqueMatcher` wraps its matcher with a `UniqueScan` of the accepted text.
`advance` refuses a token that completes an item equal to an earlier item of its array (the
backend matcher is rolled back), so no instance with a repeated item is ever accepted and every
other instance the grammar accepts still is. The mask is the backend's, minus every token that
`advance` would refuse: only tokens that can complete an item in the current lexical mode are
tried (tokens with a quote inside a string, ~160 of 49k; structural ones elsewhere), and inside
a string item a token whose closing quote ends the item is looked up by the item's text, not
scanned. While a unique array is open there is no jump-forward (`forced_bytes` is empty).
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from .base import Grammar, Matcher
from .unique_paths import UniquePaths
from .unique_scan import LIT, NUM, NUMBER_BYTES, STR, UniqueScan
from .vocab import TokenizerInfo

if TYPE_CHECKING:
    from .mask_workers import MaskWorkers

PAYLOAD_TAG = "unique-items"


def _closing_quote(data: bytes) -> int:
    """Index of the first unescaped quote of `data` read inside a string, or -1."""
    esc = False
    for i, b in enumerate(data):
        if esc:
            esc = False
        elif b == 0x5C:
            esc = True
        elif b == 0x22:
            return i
    return -1


def _may_complete_outside(data: bytes) -> bool:
    """Read outside a string, can `data` end a value (a string it opens, a container, a number,
    a literal) or start a literal? A superset: the scan decides."""
    in_str = esc = prev_num = False
    for b in data:
        if in_str:
            if esc:
                esc = False
            elif b == 0x5C:
                esc = True
            elif b == 0x22:
                return True
            continue
        if b == 0x22:
            in_str = True
        elif b in b"]}tfn" or (prev_num and b not in NUMBER_BYTES):
            return True
        prev_num = b in NUMBER_BYTES
    return False


@dataclass(frozen=True)
class TokenTables:
    """Per tokenizer: which tokens can end an item in each lexical mode."""

    quoted: np.ndarray           # ids of tokens with a quote
    close_at: tuple[int, ...]    # per quoted token: its first unescaped quote (-1: none)
    before: tuple[str | None, ...]  # per quoted token: the text before that quote (None: not decodable alone)
    deep: tuple[bool, ...]       # per quoted token: more could end after that quote
    outside: np.ndarray          # bool per id: may end a value when read outside a string
    number_end: np.ndarray       # bool per id: first byte ends a number


_TABLES: dict[str, TokenTables] = {}
_LOCK = threading.Lock()


def token_tables(info: TokenizerInfo) -> TokenTables:
    with _LOCK:
        hit = _TABLES.get(info.fingerprint)
        if hit is not None:
            return hit
        size = info.vocab_size
        outside = np.zeros(size, dtype=bool)
        number_end = np.zeros(size, dtype=bool)
        quoted, close_at, before, deep = [], [], [], []
        for tid, data in enumerate(info.token_bytes):
            if not data:
                continue
            outside[tid] = _may_complete_outside(data)
            number_end[tid] = data[0] not in NUMBER_BYTES
            if b'"' in data:
                at = _closing_quote(data)
                text: str | None = None
                if at >= 0:
                    try:
                        text = json.loads(b'"' + data[:at] + b'"')
                    except ValueError:
                        text = None
                quoted.append(tid)
                close_at.append(at)
                before.append(text)
                deep.append(at >= 0 and _may_complete_outside(data[at + 1:]))
        tables = TokenTables(np.array(quoted, dtype=np.int64), tuple(close_at), tuple(before), tuple(deep),
                             outside, number_end)
        _TABLES[info.fingerprint] = tables
        return tables


def _allowed(row: torch.Tensor, vocab: int) -> np.ndarray:
    bits = np.unpackbits(row.numpy().view(np.uint8), bitorder="little")[:vocab]
    return bits.astype(bool)


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
        """Clear the bits of tokens that `advance` would refuse for completing a repeated item."""
        scan = self.scan
        if not scan.watching() or self.inner.is_terminated():
            return
        tables, info = self.grammar.tables, self.grammar.info
        vocab = info.vocab_size
        words = row[: (vocab + 31) // 32]
        bad: list[int] = []
        if scan.mode == STR:
            ids = tables.quoted
            on = ((words.numpy()[ids >> 5] >> (ids & 31)) & 1).astype(bool)
            prefix = scan.item_prefix()
            seen = scan.top_enforced()[4] if prefix is not None else None  # type: ignore[index]
            for j in np.flatnonzero(on).tolist():
                tid = int(ids[j])
                if tables.close_at[j] < 0 and not scan.aux[2]:
                    continue  # no closing quote in it: the string goes on
                if prefix is not None:
                    text = tables.before[j]
                    if text is not None:
                        if ("s", prefix + text) in seen:  # type: ignore[operator]
                            bad.append(tid)
                        elif tables.deep[j] and not self._fits(tid):
                            bad.append(tid)
                        continue
                elif not scan.aux[2] and not tables.deep[j] and (scan.aux[0] or scan.top_enforced() is None):
                    continue  # ends a key or a string that is no item; nothing after it can end one
                if not self._fits(tid):
                    bad.append(tid)
        else:
            allowed = _allowed(words, vocab)
            if scan.mode == NUM:
                allowed &= tables.outside | tables.number_end
            elif scan.mode != LIT:
                allowed &= tables.outside
            bad = [tid for tid in np.flatnonzero(allowed).tolist() if not self._fits(tid)]
        if bad:
            ids_t = torch.tensor(bad, dtype=torch.int64)
            clear = torch.zeros(words.shape[0], dtype=torch.int64)
            clear.index_add_(0, ids_t >> 5, torch.ones_like(ids_t) << (ids_t & 31))
            words &= ~clear.to(torch.int32)

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
