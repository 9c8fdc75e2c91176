"""NGRAM drafting (prompt lookup): continue the request's text the way it continued before.

The last n tokens of prompt + output are looked up among their earlier occurrences (longest n
first, most recent occurrence); the tokens that followed are the draft (where they run into the end
of the text, a loop, continued with its period). No model, no device: it
runs wherever the scheduler runs. Each request keeps an index of its n-grams that grows with its
output (an incremental suffix index: each new token adds one entry per n), so a lookup costs one
dictionary probe per n in NGRAM_LENGTHS, never a scan of the prompt.

How far to draft is decided per request: a long match (the text is being copied) drafts up to the
step's limit, a short one at most as many tokens as it matched; and the request's draft depth grows
while its drafts are accepted whole and falls back to what was accepted on a rejection (copying
runs long, then stops at an edit: a long draft pays on the run, a short one at the edit). Where a verify step
costs about the same at any depth (batch 1 on a GPU) the SpecDecoder may floor every depth at the step's k
(`min_depth`; spec_decoder.FULL_DEPTH_ROWS, on for batch 1 since the H200 A/B of 2026-12-05).

With a branching factor above 1 (`--speculative-eagle-topk`) a request drafts a token tree
(draft_tree.py) instead of one chain: the continuations of several earlier occurrences of its
suffixes (longest match first, most recent first; the index keeps the latest OCCURRENCES of each
n-gram) merged into a trie of at most `--speculative-num-draft-tokens - 1` nodes. The first
candidate is the chain the request would draft without branching; the others cover the places where
the text was continued differently before, which a single chain guesses wrong.
"""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from radixlm.runtime.speculative.copy_source import CopySources
from radixlm.runtime.speculative.draft_tree import DraftTree

# n-gram lengths indexed, tried longest first. A single-token match proposes too often and is right
# too rarely to pay for its verify rows; a match of LONG_MATCH or more tokens means copying.
NGRAM_LENGTHS = (16, 12, 8, 6, 4, 3, 2)
# ... except where a verify row costs next to nothing and a step without drafts counts as a plain step (batch 1 on a
# GPU, spec_decoder.SHORT_MATCH_ROWS): there a drafter built with `short=True` also indexes single tokens and, while
# its `min_match` is 1, drafts after a 1-token match (SGLang's NGRAM default) rather than decode a plain step
SHORT_LENGTHS = (*NGRAM_LENGTHS, 1)
LONG_MATCH = 4
START_DEPTH = 2  # draft depth of a request before any verify result
DEPTH_STEP = 2  # depth added after a verify that accepted every draft
MAX_DEPTH = 16
OCCURRENCES = 4  # latest occurrences kept per n-gram (tree candidates)
FEW_NEW = 8  # up to this many new tokens, keys are sliced one by one (the zip of n shifted slices pays above)
# A backlog (a prompt; output decoded while drafting was off; a rebuild) is indexed at most this many tokens a step
# in all (`NgramDrafter.step_tokens`, set per step by the SpecDecoder; ~2.2 us a token here: ~5 ms of the 2-core CPU);
# a request drafts once its index has caught up. A 30,000-token prompt's index built in one step held the scheduler's
# loop 65 ms (stall1, 2026-12-05). Up to SMALL_SYNC new tokens (a verify step's run) are indexed whatever is left.
STEP_TOKENS = 2048
SMALL_SYNC = 64


@dataclass
class NgramIndex:
    """For every n-gram of tokens[:indexed] (n in NGRAM_LENGTHS) the positions right after its latest
    OCCURRENCES occurrences: the latest in `follow`, earlier ones (oldest first) in `older` when the
    index keeps more than one (`occurrences`, trees). The n-grams that end at the last token are
    left out, so a lookup of the current suffix finds earlier occurrences whose continuation is known."""

    tokens: list[int] = field(default_factory=list)
    # Keyed by the n-gram's hash (`key`), not the tuple: an int is not tracked by the cyclic collector,
    # and ~3,500 tuples kept per 512-token prompt were (64 prompts indexed while decoding at batch 64:
    # ~65 extra collections a run on the H200, 2026-12-04). Two n-grams of one hash share an entry: a
    # wrong draft at worst, which verification rejects.
    follow: dict[int, int] = field(default_factory=dict)
    older: dict[int, list[int]] = field(default_factory=dict)
    occurrences: int = 1
    lengths: tuple[int, ...] = NGRAM_LENGTHS  # n-gram lengths indexed, longest first

    def sync(self, prompt: list[int], output: list[int], limit: int | None = None) -> int:
        """Index the tokens appended since the last call, at most `limit` of them (the next call goes on
        where this one stopped: the index built in pieces equals the one built at once); returns how many.
        Output rewritten behind our back (grammar jump-forward re-tokenizes its last token) means a
        rebuild: a stale index only proposes bad drafts, which verification rejects, but a fresh one
        proposes good ones."""
        have = len(self.tokens)
        total = len(prompt) + len(output)
        if have > total or (have and self._token_at(prompt, output, have - 1) != self.tokens[-1]):
            self.tokens, self.follow, self.older, have = [], {}, {}, 0
        if limit is not None and total - have > limit:
            total = have + max(limit, 0)
        if have < len(prompt):
            self.tokens.extend(prompt[have:total])
            self.tokens.extend(output[: max(total - len(prompt), 0)])
        else:
            self.tokens.extend(output[have - len(prompt) : total - len(prompt)])
        # n-grams ending at positions [have - 1, total - 2]: each now has a known next token. Keys are
        # built by zip over shifted slices and stored by dict.update (a 512-token prompt's first sync
        # is ~1.5 ms, not ~5 ms of per-key Python): in order, so a repeated n-gram keeps its latest.
        toks = self.tokens
        if total - have <= FEW_NEW:  # a decode step's few tokens: one tuple slice per key, every n at once
            # (one comprehension, not one per n: 12 vs 43 us for 3 tokens on the 2-core CPU)
            self._add([(hash(tuple(toks[e + 1 - n : e + 1])), e + 1) for n in self.lengths
                       for e in range(max(have - 1, n - 1), total - 1)])
            return total - have
        for n in self.lengths:
            lo = max(have - 1, n - 1)  # first end position
            if lo >= total - 1:
                continue
            seg = toks[lo + 1 - n : total - 1]
            self._add(zip(map(hash, zip(*(seg[j : len(seg) - n + 1 + j] for j in range(n)))), range(lo + 1, total)))
        return total - have

    @staticmethod
    def key(ngram: list[int] | tuple[int, ...]) -> int:
        """An n-gram's key in `follow` and `older`."""
        return hash(tuple(ngram))

    def _add(self, pairs: Iterable[tuple[int, int]]) -> None:
        """(n-gram, position after it) pairs, in text order per n: a repeated n-gram keeps its latest
        position in `follow`, the ones before in `older`."""
        follow = self.follow
        if self.occurrences == 1:
            follow.update(pairs)
            return
        older, cap = self.older, self.occurrences - 1
        for key, pos in pairs:
            prev = follow.get(key)
            if prev is not None:
                kept = older.setdefault(key, [])
                kept.append(prev)
                if len(kept) > cap:
                    del kept[0]
            follow[key] = pos

    @staticmethod
    def _token_at(prompt: list[int], output: list[int], i: int) -> int:
        return prompt[i] if i < len(prompt) else output[i - len(prompt)]

    def continuation(self, start: int, max_tokens: int) -> list[int]:
        """Up to max_tokens tokens from `start` (right after an earlier occurrence of the suffix). When
        they run into the end of the text, the text is copying itself with period len - start (a loop:
        random-weight and repetitive greedy outputs fall into them): the draft goes on with that period,
        as copying from the occurrence would continue into the drafted tokens themselves."""
        return self.read(start, [], max_tokens)

    def lookup(self, max_tokens: int, min_match: int = 2) -> tuple[list[int], int]:
        """(the continuation of the longest matching suffix, up to max_tokens; the match length n),
        ([], 0) when no suffix of n >= min_match tokens (of the lengths indexed) occurred before."""
        return self.lookup_after([], max_tokens, min_match)

    def find_after(self, extra: list[int], min_match: int = 2) -> tuple[int, int]:
        """(the position after the latest earlier occurrence of the longest suffix of n >= min_match tokens of the
        indexed tokens + `extra`, n), (-1, 0) if none. Only indexed n-grams are found: `extra` (a guess at tokens
        not yet verified) is not indexed."""
        toks, m = self.tokens, len(extra)
        total = len(toks) + m
        for n in self.lengths:
            if n < min_match:
                break
            if total <= n:
                continue
            start = self.follow.get(hash(tuple(toks[-n:])) if not m else
                                    self.key(extra[m - n:] if n <= m else toks[len(toks) - (n - m):] + extra))
            if start is not None:
                return start, n
        return -1, 0

    def read(self, start: int, extra: list[int], max_tokens: int) -> list[int]:
        """max_tokens tokens of the indexed tokens + `extra` from `start`, a loop going on with its period where they
        run into the end (as `continuation`)."""
        toks = self.tokens
        if start + max_tokens <= len(toks):
            return toks[start : start + max_tokens]
        period = len(toks) + len(extra) - start
        if period <= 0:
            return []
        return [toks[i] if i < len(toks) else extra[i - len(toks)] for i in (start + j % period for j in range(max_tokens))]

    def lookup_after(self, extra: list[int], max_tokens: int, min_match: int = 2) -> tuple[list[int], int]:
        """`lookup` as if `extra` were appended to the indexed tokens, without indexing them (a guess
        at tokens not yet verified: the index stays as the verified text left it). Matches are found
        among the indexed n-grams (`find_after`); the continuation reads the tokens and then `extra` (`read`)."""
        start, n = self.find_after(extra, min_match)
        return (self.read(start, extra, max_tokens), n) if start >= 0 else ([], 0)

    def candidates(self, max_tokens: int) -> list[tuple[list[int], int]]:
        """Every distinct continuation (up to max_tokens) of the suffixes that occurred before, with its
        match length: longest match first, most recent occurrence first."""
        toks, out, seen = self.tokens, [], set()
        for n in NGRAM_LENGTHS:  # (trees: matches of 2 tokens or more)
            if len(toks) <= n:
                continue
            key = hash(tuple(toks[-n:]))
            latest = self.follow.get(key)
            if latest is None:
                continue
            for start in (latest, *reversed(self.older.get(key, ()))):
                cont = self.continuation(start, max_tokens)
                if cont and tuple(cont) not in seen:
                    seen.add(tuple(cont))
                    out.append((cont, n))
        return out

    def propose(self, max_tokens: int) -> list[int]:
        return self.lookup(max_tokens)[0]


@dataclass
class DraftDepth:
    """A request's draft depth: grows by DEPTH_STEP while verifies accept every draft, else falls
    to the accepted count + 1 (the edit point is near: draft little until copying resumes)."""

    depth: int = START_DEPTH

    def record(self, drafted: int, accepted: int) -> None:
        if drafted:
            self.depth = min(self.depth + DEPTH_STEP, MAX_DEPTH) if accepted == drafted else accepted + 1


def draft_length(match: int, depth: int, max_tokens: int) -> int:
    """Tokens to draft after a match of `match` tokens: a short match drafts at most what it matched; a resumed copy
    source (match 0, copy_source.py) as a long match."""
    return min(max_tokens, depth if match >= LONG_MATCH or match == 0 else min(depth, match))


def build_tree(candidates: list[tuple[list[int], int]], depth: int, max_depth: int, max_nodes: int,
               topk: int) -> DraftTree:
    """The candidates (best first) merged into a trie: each cut to its draft length, at most `topk`
    children per node, at most `max_nodes` nodes; a candidate is added as far as it fits."""
    tokens: list[int] = []
    parents: list[int] = []
    children: dict[int, dict[int, int]] = {}
    for cont, match in candidates:
        cur = -1
        for tok in cont[: draft_length(match, depth, max_depth)]:
            kids = children.setdefault(cur, {})
            if tok in kids:
                cur = kids[tok]
                continue
            if len(kids) >= topk or len(tokens) >= max_nodes:
                break
            kids[tok] = len(tokens)
            tokens.append(tok)
            parents.append(cur)
            cur = kids[tok]
        if len(tokens) >= max_nodes:
            break
    return DraftTree(tokens, parents)


class NgramDrafter:
    """Per-request n-gram indexes and draft depths; `propose` drafts for one request from its own
    tokens only, so a request drafts the same alone or in any batch."""

    def __init__(self, occurrences: int = 1, short: bool = False) -> None:
        self.occurrences = occurrences  # earlier occurrences kept per n-gram (OCCURRENCES for trees)
        self.lengths = SHORT_LENGTHS if short else NGRAM_LENGTHS  # short: single tokens indexed too
        self.indexes: dict[int, NgramIndex] = {}
        self.depths: dict[int, DraftDepth] = {}
        # backlog tokens this step may still index (STEP_TOKENS; reset by the SpecDecoder each step); None: no bound
        self.step_tokens: int | None = None
        # A floor under every request's draft depth, set per step by the SpecDecoder (the step's k where a verify
        # step costs about the same at any k: batch 1 on a GPU); 0: the depths alone
        self.min_depth = 0
        # ... and the shortest match that drafts (1: after a single matching token, for a drafter built `short`), and
        # whether a request with no match goes on copying from where its last chain was copied (copy_source.py)
        self.min_match = 2
        self.follow_source = False
        # ... and whether a match shorter than LONG_MATCH drafts as deep as a long one (not at most its length)
        self.deep_short = False
        self.sources = CopySources()

    def _index(self, key: int) -> NgramIndex:
        index = self.indexes.get(key)  # (not setdefault: it would build an index per call)
        if index is None:
            index = self.indexes[key] = NgramIndex(occurrences=self.occurrences, lengths=self.lengths)
        return index

    def _synced(self, key: int, prompt: list[int], output: list[int]) -> NgramIndex | None:
        """The request's index with prompt + output indexed, within the step's `step_tokens`; None while it
        lags behind (the request drafts nothing this step: a partial index would find other matches)."""
        index = self._index(key)
        if self.step_tokens is None:
            index.sync(prompt, output)
            return index
        self.step_tokens = max(self.step_tokens - index.sync(prompt, output, max(self.step_tokens, SMALL_SYNC)), 0)
        return index if len(index.tokens) == len(prompt) + len(output) else None

    def index_upto(self, key: int, prompt: list[int], end: int, limit: int) -> int:
        """A prefill chunk's tokens (the prompt up to `end`) indexed, at most `limit`; returns how many."""
        index = self._index(key)
        return index.sync(prompt[:end], [], limit) if len(index.tokens) < end else 0

    def _depth(self, key: int) -> DraftDepth:
        depth = self.depths.get(key)
        if depth is None:
            depth = self.depths[key] = DraftDepth()
        return depth

    def propose(self, key: int, prompt: list[int], output: list[int], max_tokens: int) -> list[int]:
        if max_tokens <= 0:
            return []
        index = self._synced(key, prompt, output)
        if index is None:
            return []
        start, match = self._find(key, index, [])
        if start < 0:
            return []
        draft = index.read(start, [], self._length(match, max(self._depth(key).depth, self.min_depth), max_tokens))
        if self.follow_source and draft:
            self.sources.drafted(key, start, len(index.tokens), match == 0)
        return draft

    def _length(self, match: int, depth: int, max_tokens: int) -> int:
        return draft_length(LONG_MATCH if self.deep_short and match else match, depth, max_tokens)

    def _find(self, key: int, index: NgramIndex, extra: list[int]) -> tuple[int, int]:
        """(where the request's next tokens are copied from, the match length: 0 for a resumed copy source),
        (-1, 0) if nowhere."""
        start, match = index.find_after(extra, self.min_match)
        if start < 0 and self.follow_source:
            start = self.sources.resume(key, len(index.tokens) + len(extra))
        return start, match

    def guess_after(self, key: int, prompt: list[int], output: list[int], drafts: list[int], max_tokens: int
                    ) -> list[int]:
        """What follows prompt + output + `drafts` if every draft is accepted: the token after them (the
        verify step's bonus, guessed), then up to max_tokens - 1 drafts for the step after, at the depth
        an all-accepted verify leaves (`DraftDepth.record`). The index takes prompt + output only."""
        if max_tokens <= 1:
            return []
        index, (start, match) = self._lookup_after(key, prompt, output, drafts)
        if index is None or start < 0:
            return []
        depth = self._length(match, self.depth_after(key, len(drafts), len(drafts)), max_tokens - 1)
        return index.read(start, drafts, 1 + depth)

    def propose_after(self, key: int, prompt: list[int], output: list[int], run: list[int], drafted: int,
                      max_tokens: int) -> list[int]:
        """`propose` once a verify step's `run` (its accepted drafts and the token after them, of `drafted`
        drafts) is appended, before it is: the index takes prompt + output only, the depth is the one
        that verify result leaves."""
        if max_tokens <= 0:
            return []
        index, (start, match) = self._lookup_after(key, prompt, output, run)
        if index is None or start < 0:
            return []
        return index.read(start, run, self._length(match, self.depth_after(key, drafted, len(run) - 1), max_tokens))

    def _lookup_after(self, key: int, prompt: list[int], output: list[int], extra: list[int]
                      ) -> tuple[NgramIndex | None, tuple[int, int]]:
        index = self._synced(key, prompt, output)
        return index, (self._find(key, index, extra) if index is not None else (-1, 0))

    def depth_after(self, key: int, drafted: int, accepted: int) -> int:
        """The request's draft depth once a verify of `drafted` drafts accepted `accepted` is recorded (and the
        step's floor applied)."""
        depth = DraftDepth(self._depth(key).depth)
        depth.record(drafted, accepted)
        return max(depth.depth, self.min_depth)

    def propose_tree(self, key: int, prompt: list[int], output: list[int], max_depth: int, max_nodes: int,
                     topk: int) -> DraftTree:
        """A token tree of at most max_nodes nodes and depth max_depth (topk = 1: `propose`'s chain)."""
        if max_depth <= 0 or max_nodes <= 0:
            return DraftTree([], [])
        index = self._synced(key, prompt, output)
        if index is None:
            return DraftTree([], [])
        depth = self._depth(key).depth
        return build_tree(index.candidates(max_depth), depth, max_depth, max_nodes, topk)

    def warm(self, key: int, prompt: list[int], output: list[int], min_behind: int = FEW_NEW,
             limit: int | None = None) -> int:
        """Index what the request's index lacks (at most `limit` tokens), if more than `min_behind` tokens (a
        decode step's few are cheap at `propose`); returns the tokens indexed."""
        index = self._index(key)
        behind = len(prompt) + len(output) - len(index.tokens)
        if behind <= min_behind:
            return 0
        return index.sync(prompt, output, limit)

    def on_verified(self, key: int, drafted: int, accepted: int) -> None:
        self._depth(key).record(drafted, accepted)
        self.sources.verified(key, accepted)

    def forget(self, key: int) -> None:
        self.indexes.pop(key, None)
        self.depths.pop(key, None)
        self.sources.forget(key)
