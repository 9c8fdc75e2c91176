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
whitespace only postpones the dead end (`_blank_only`), and the lookahead then sees it. Where the
items are listed (enum/const), a state whose item can become no unused listed value is a dead end
however deep (unique_items_left.py): such a row is cleared, and where few values are left each
token is read on the scan alone and cleared if it leads there. Other deeper dead ends are left.
The same check refuses repeated keys where the schema counts keys (unique_keys.py).
Token classes per tokenizer: unique_tokens.py. While a unique array is open there is no
jump-forward (`forced_bytes` is empty).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from .base import Grammar, Matcher
from .unique_items_left import dead_here, fewest_left
from .unique_paths import UniquePaths
from .unique_scan import AFTER, COLON, KEY, LIT, NUM, STR, VALUE, UniqueScan
from .unique_tokens import allowed_mask, clear_bits, ids_of, row_bits, token_tables
from .vocab import TokenizerInfo

if TYPE_CHECKING:
    from .mask_workers import MaskWorkers

PAYLOAD_TAG = "unique-items"
LOOKAHEAD = 8  # tokens other than whitespace left in a row, at most, for the dead-end lookahead
LOOKAHEAD_DEPTH = 2  # steps on: a string item's opening quote, then its one-character items
LOOKAHEAD_PROBES = 24  # next rows (backend fills) per mask row, at most
LISTED_TRIES = 256  # tokens read on the scan alone for listed items' dead ends, at most
LISTED_LEFT = 8  # ... where an open unique array has at most this many listed values left unused
_BETWEEN = (VALUE, KEY, AFTER, COLON)  # scan modes between JSON tokens: whitespace there is insignificant


class UniqueGrammar(Grammar):
    def __init__(self, inner: Grammar, paths: UniquePaths) -> None:
        self.inner, self.paths = inner, paths
        self.info, self.kind, self.spec, self.backend = inner.info, inner.kind, inner.spec, inner.backend
        self.tables = token_tables(inner.info)
        self.listed = any(v is not None for v in paths.item_values + paths.key_names)  # items or names listed

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
        if dead_here(self.scan):  # no listed item (or name) is left to write on into
            words[:] = 0
            return
        few = fewest_left(self.scan)
        if few is not None and few <= LISTED_LEFT:
            self._remove_listed_dead_ends(words)
        solid = words & t.solid_words  # on the packed words: no pass over the vocabulary
        left = int(np.bitwise_count(solid.view(np.uint32)).sum())
        if depth > 0 and 0 < left <= LOOKAHEAD:
            candidates, dead = ids_of(solid), []
            for tid in candidates.tolist():
                if budget[0] <= 0 and not self.grammar.listed:
                    break
                if self._probe_dead(tid, row, depth, budget):
                    dead.append(tid)
            if dead:  # whitespace and then a dead token: the same step after a gap, dead too
                data = self.grammar.info.token_bytes
                ends = {data[tid] for tid in dead}
                clear_bits(words, dead + [tid for tid in ids_of(words & t.spaced_words).tolist()
                                          if data[tid].lstrip(b" \t\n\r") in ends])
                left -= len(dead)
        if depth > 0 and self.scan.mode == NUM and t.space >= 0 and row_bits(words, t.space_id)[0] \
                and not self._closes_after_gap() and self._probe_dead(t.space, row, depth, budget):
            clear_bits(words, ids_of(words & (t.ws_words | t.spaced_words)).tolist())  # any gap ends the number alike
        if not left and self._blank_only():
            words[:] = 0

    def _closes_after_gap(self) -> bool:
        """Read on the scan alone: may the container around this number close after a gap (no
        repeated item)? Then the gap is no dead end for that reason, and the probe is skipped."""
        if not self.scan.stack:  # a number at the top: nothing to close
            return True
        snap = self.scan.snapshot()
        try:
            return self.scan.feed(b" ]" if self.scan.stack[-1][0] == "a" else b" }")
        finally:
            self.scan.restore(snap)

    def _probe_dead(self, tid: int, row: torch.Tensor, depth: int, budget: list[int]) -> bool:
        """Does `tid` lead only to a dead end: to no listed item or name, or (one backend fill from
        `budget`) to a row that is empty once repeats and dead ends depth - 1 steps on are removed?"""
        probe = self.copy()
        if not probe.advance(tid) or probe.is_accepting() or probe.inner.is_terminated():
            return False
        if dead_here(probe.scan):  # no backend fill needed
            return True
        if budget[0] <= 0:
            return False
        budget[0] -= 1
        scratch = torch.zeros((1, row.shape[0]), dtype=row.dtype)
        probe.inner.fill_next_token_bitmask(scratch, 0)
        probe._remove_repeats(scratch[0])
        probe._remove_dead_ends(scratch[0], depth - 1, budget)
        return not scratch[0, : self.grammar.tables.words].any()

    def _remove_listed_dead_ends(self, words: np.ndarray) -> None:
        """Clear the tokens (at most LISTED_TRIES, whitespace first or not) after which an open
        unique array's item can become no listed value left (`items_left`): read on the scan alone,
        no backend fill."""
        t = self.grammar.tables
        ids = ids_of(words & t.nonblank_words)
        if ids.shape[0] > LISTED_TRIES and self.scan.mode == STR:  # in a free string only a closing quote
            ids = ids_of(words & t.closing_words)                   # can end in such a state
        if not 0 < ids.shape[0] <= LISTED_TRIES:
            return
        data, scan, dead = self.grammar.info.token_bytes, self.scan, []
        for tid in ids.tolist():
            snap = scan.snapshot()
            try:
                if scan.feed(data[tid]) and dead_here(scan):
                    dead.append(tid)
            finally:
                scan.restore(snap)
        if dead:
            clear_bits(words, dead)

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
            on = row_bits(words, t.quoted)
            item = scan.top_enforced() is not None and not scan.aux[0]
            keyed = scan.aux[0] and bool(scan.keys_seen())
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
            candidates = np.flatnonzero(allowed_mask(words, self.grammar.info.vocab_size))
            bad = [tid for tid in candidates.tolist() if not self._fits(tid)]
        else:
            gap = scan.enforced_gap()  # an item ends at the enforced array only closing this many levels
            on = row_bits(words, t.structural) & (t.closings >= (99 if gap is None else gap))
            candidates = t.structural[on]
            top = scan.top_enforced()
            if top is not None and any(type(x) is tuple and x[0] == "b" or x is None for x in top[4]):
                candidates = np.union1d(candidates, t.literal[row_bits(words, t.literal)])
            bad = []
            if scan.mode == NUM and top is not None:  # a byte that ends the number ends the item
                if not scan.number_fits():
                    ends = allowed_mask(words, self.grammar.info.vocab_size) & t.number_end
                    bad = np.flatnonzero(ends).tolist()
                    candidates = np.setdiff1d(candidates, bad)
            bad += [tid for tid in candidates.tolist() if not self._fits(tid)]
        if bad:
            clear_bits(words, bad)

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
