"""A regular language over bytes, determinized lazily: the state key of a mask table.

An expression (`Expr`: byte sets, sequences, alternatives, bounded or open repetitions) is built
into a Thompson NFA once; DFA states (epsilon-closed NFA state sets) are made only when a walk
reaches them, and a token's transition (its bytes walked from a state) is cached. So a language
with thousands of states (bounded strings, whitespace runs) costs only the states rows visit, and a
row's step is one dictionary look-up once its (state, token) pair has been seen.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

DEAD = -1  # no continuation of the bytes so far is in the language
UNKNOWN = -2  # in a move table: a move not computed yet


@dataclass(frozen=True)
class Expr:
    """op: "set" (one byte of `bits`, a 256-bit mask), "seq", "alt", "rep" (parts[0] repeated
    lo..hi times; hi None = unbounded)."""

    op: str
    parts: tuple[Expr, ...] = ()
    bits: int = 0
    lo: int = 0
    hi: int | None = None


def byte_set(values: Sequence[int] | range) -> Expr:
    bits = 0
    for v in values:
        bits |= 1 << v
    return Expr("set", bits=bits)


def literal(data: bytes) -> Expr:
    return seq(*(Expr("set", bits=1 << b) for b in data))


def seq(*parts: Expr) -> Expr:
    return Expr("seq", tuple(parts))


def alt(*parts: Expr) -> Expr:
    return Expr("alt", tuple(parts))


def rep(part: Expr, lo: int, hi: int | None) -> Expr:
    if lo < 0 or (hi is not None and hi < lo):
        raise ValueError(f"bad repetition bounds {lo}..{hi}")
    return Expr("rep", (part,), lo=lo, hi=hi)


def opt(part: Expr) -> Expr:
    return rep(part, 0, 1)


def utf8_char(excluded_ascii: Sequence[int]) -> Expr:
    """One UTF-8 encoded Unicode scalar value (no surrogates, no overlongs), ASCII minus `excluded_ascii`."""
    tail = byte_set(range(0x80, 0xC0))
    ascii_ok = [b for b in range(0x80) if b not in set(excluded_ascii)]
    return alt(
        byte_set(ascii_ok),
        seq(byte_set(range(0xC2, 0xE0)), tail),
        seq(byte_set([0xE0]), byte_set(range(0xA0, 0xC0)), tail),
        seq(byte_set([*range(0xE1, 0xED), 0xEE, 0xEF]), tail, tail),
        seq(byte_set([0xED]), byte_set(range(0x80, 0xA0)), tail),
        seq(byte_set([0xF0]), byte_set(range(0x90, 0xC0)), tail, tail),
        seq(byte_set(range(0xF1, 0xF4)), tail, tail, tail),
        seq(byte_set([0xF4]), byte_set(range(0x80, 0x90)), tail, tail),
    )


def nfa_states(expr: Expr) -> int:
    """How many states `LazyDfa(expr)` builds its NFA with, counted on the expression (shared
    subexpressions counted once per use, as the build visits them) without building it: the build
    costs a few µs of Python a state, so a caller can refuse an expression whose NFA alone would
    take seconds (bounded repetitions of bounded repetitions multiply)."""
    memo: dict[int, int] = {}

    def size(e: Expr) -> int:
        hit = memo.get(id(e))
        if hit is not None:
            return hit
        if e.op == "set":
            n = 1
        elif e.op == "seq":
            n = sum(size(p) for p in e.parts)
        elif e.op == "alt":
            n = 1 + sum(1 + size(p) for p in e.parts)
        elif e.op == "rep":
            part = size(e.parts[0])
            n = e.lo * part + (1 + part if e.hi is None else 1 + (e.hi - e.lo) * part)
        else:
            raise ValueError(f"unknown expression op {e.op!r}")
        memo[id(e)] = n
        return n

    return 1 + size(expr)  # the start state


class _Nfa:
    def __init__(self) -> None:
        self.eps: list[list[int]] = []
        self.edges: list[list[tuple[int, int]]] = []

    def state(self) -> int:
        self.eps.append([])
        self.edges.append([])
        return len(self.eps) - 1

    def build(self, e: Expr, start: int) -> int:
        """Add `e` from `start`; returns its end state."""
        if e.op == "set":
            end = self.state()
            self.edges[start].append((e.bits, end))
            return end
        if e.op == "seq":
            for part in e.parts:
                start = self.build(part, start)
            return start
        if e.op == "alt":
            end = self.state()
            for part in e.parts:
                s = self.state()
                self.eps[start].append(s)
                self.eps[self.build(part, s)].append(end)
            return end
        if e.op == "rep":
            part = e.parts[0]
            for _ in range(e.lo):
                start = self.build(part, start)
            if e.hi is None:  # a loop: part*, entered and left by epsilon edges
                loop = self.state()
                self.eps[start].append(loop)
                self.eps[self.build(part, loop)].append(loop)
                return loop
            end = self.state()
            for _ in range(e.hi - e.lo):  # nested optionals: x(x(x)?)? keeps the closures small
                self.eps[start].append(end)
                start = self.build(part, start)
            self.eps[start].append(end)
            return end
        raise ValueError(f"unknown expression op {e.op!r}")


class LazyDfa:
    """Subset construction on demand. State 0 is the start; `DEAD` (-1) the empty set.
    Not thread-safe: one owner (the scheduler's thread) walks it."""

    def __init__(self, expr: Expr, max_states: int = 200_000) -> None:
        nfa = _Nfa()
        start = nfa.state()
        self._final = nfa.build(expr, start)
        self._eps, self._edges = nfa.eps, nfa.edges
        self.max_states = max_states
        # Bytes no edge tells apart share a class (JSON: ~20 of them), and a state's move is computed
        # once per class: a string state's 200-odd plain bytes cost one subset step, not 200.
        signatures: dict[tuple[bool, ...], int] = {}
        masks = sorted({bits for edges in nfa.edges for bits, _ in edges})
        self._class = [signatures.setdefault(tuple(bool(m >> b & 1) for m in masks), len(signatures))
                       for b in range(256)]
        self._example = [self._class.index(c) for c in range(len(signatures))]
        self._class_size: list[int] | None = None
        self._by_size: list[int] = []
        self._closure: dict[int, frozenset[int]] = {}
        self._ids: dict[frozenset[int], int] = {}
        self._sets: list[frozenset[int]] = []
        self._moves: list[list[int]] = []  # per state, per byte class: the next state, DEAD or UNKNOWN
        self.accepting: list[bool] = []
        self._intern(self._close([start]))

    @property
    def num_states(self) -> int:
        return len(self._sets)

    def _close(self, states: Sequence[int] | set[int]) -> frozenset[int]:
        out: set[int] = set()
        for s in states:
            hit = self._closure.get(s)
            if hit is None:
                seen = {s}
                todo = [s]
                while todo:
                    for t in self._eps[todo.pop()]:
                        if t not in seen:
                            seen.add(t)
                            todo.append(t)
                hit = self._closure[s] = frozenset(seen)
            out |= hit
        return frozenset(out)

    def _intern(self, states: frozenset[int]) -> int:
        if not states:
            return DEAD
        q = self._ids.get(states)
        if q is None:
            if len(self._sets) >= self.max_states:
                raise OverflowError(f"more than {self.max_states} DFA states")
            q = self._ids[states] = len(self._sets)
            self._sets.append(states)
            self._moves.append([UNKNOWN] * len(self._example))
            self.accepting.append(self._final in states)
        return q

    @property
    def num_byte_classes(self) -> int:
        return len(self._example)

    def byte_class(self, byte: int) -> int:
        return self._class[byte]

    def class_example(self, cls: int) -> int:
        """A byte of class `cls` (every byte of a class moves every state alike)."""
        return self._example[cls]

    @property
    def nfa_size(self) -> int:
        """States of the NFA the subsets are drawn from (one expression built twice: equal)."""
        return len(self._eps)

    def nfa_set(self, q: int) -> tuple[int, ...]:
        """State `q`'s NFA states, sorted: its name independent of the order states were built in."""
        return tuple(sorted(self._sets[q]))

    def intern(self, nfa_set: tuple[int, ...]) -> int:
        """The state of this NFA set (made if no walk reached it yet); OverflowError past max_states."""
        return self._intern(frozenset(nfa_set))

    def step(self, q: int, byte: int) -> int:
        cls = self._class[byte]
        nxt = self._moves[q][cls]
        if nxt == UNKNOWN:
            bit = 1 << self._example[cls]
            targets = {t for s in self._sets[q] for bits, t in self._edges[s] if bits & bit}
            nxt = self._moves[q][cls] = self._intern(self._close(targets)) if targets else DEAD
        return nxt

    def move_table(self) -> list[list[int]]:
        """Per state, its move on each byte class (DEAD, or UNKNOWN where not computed yet)."""
        return [list(moves) for moves in self._moves]

    def add_moves(self, q: int, row: list[int]) -> None:
        """Moves of state `q` computed elsewhere (another walk of the same expression, its targets
        renamed into this DFA's states): the subset steps need not be taken here. UNKNOWN entries
        are skipped; moves known here already stay. `row` is kept (the caller's own list)."""
        moves = self._moves[q]
        if moves.count(UNKNOWN) == len(moves):
            self._moves[q] = row
        else:
            self._moves[q] = [nxt if nxt != UNKNOWN else theirs for nxt, theirs in zip(moves, row)]

    def forces_a_byte(self, q: int) -> bool:
        """Every accepted continuation from `q` begins with one same byte: `q` is not accepting and a
        single byte leads to a live state (every state here can still reach acceptance: expressions
        have no dead ends, so the live bytes are exactly the possible next bytes)."""
        if q == DEAD or self.accepting[q]:
            return False
        if self._class_size is None:  # widest classes first: a live one answers False at once
            self._class_size = [self._class.count(c) for c in range(len(self._example))]
            self._by_size = sorted(range(len(self._example)), key=lambda c: -self._class_size[c])  # type: ignore[index]
        live = 0
        for c in self._by_size:
            if self.step(q, self._example[c]) != DEAD:
                if self._class_size[c] != 1 or live:
                    return False
                live = 1
        return live == 1

    def walk(self, q: int, data: bytes) -> int:
        classes, moves = self._class, self._moves
        for b in data:
            nxt = moves[q][classes[b]]
            q = self.step(q, b) if nxt == UNKNOWN else nxt
            if q == DEAD:
                return DEAD
        return q
