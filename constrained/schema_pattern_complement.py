"""The complement of a JSON-schema `pattern` as a positive regex: what `not: {pattern}` needs.

A `pattern` holds when the ECMA-262 regex matches anywhere in the string. Its complement is a
regular language too: we build the pattern's automaton (interegular), take its complement over
every character, and turn the automaton back into an anchored regex by state elimination.
Only patterns whose meaning we reproduce exactly are taken: ECMA's `.` and `\\s`/`\\S` are
spelled out (interegular's differ), `^`/`$` only at the ends of top-level alternatives;
lookarounds, backreferences, word boundaries, flags and unicode property classes raise
`Unsupported`, as does a result past MAX_REGEX characters.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

import interegular
from interegular.fsm import anything_else

from .schema_negation import NOT_IN_WORDS, Unsupported, regex_char, words_pattern

MAX_REGEX = 20_000
MAX_PATTERN = 1_000
# ECMA-262 WhiteSpace and LineTerminator: what \s matches.
_WS = "\t\n\x0b\x0c\r \xa0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007\u2008\u2009\u200a" \
      "\u2028\u2029\u202f\u205f\u3000\ufeff"
_WS_CLASS = _WS  # literal characters: interegular reads no \\u escapes
_DOT = "[^\n\r\u2028\u2029]"
_UNSUPPORTED_ESCAPES = set("bBpPkcu0123456789")


def _refuse(why: str) -> Unsupported:
    return Unsupported("pattern", f"the complement of pattern: {why}")


def _literal(c: str) -> str:
    """`c` as an interegular literal (escaped when special)."""
    return c if c.isascii() and c.isalnum() else "\\" + c if c in "\\^$.|?*+()[]{}-/" else c


def _translate(p: str) -> list[tuple[bool, str, bool]]:
    """Split `p` into top-level alternatives, each (anchored at start, body, anchored at end),
    with ECMA's `.`, `\\s`, `\\S` and `\\uXXXX` spelled out for interegular."""
    alts: list[tuple[bool, str, bool]] = []
    body, depth, in_class, i = "", 0, False, 0
    start = end = False

    def close() -> None:
        alts.append((start, body, end))

    while i < len(p):
        c = p[i]
        if end and c != "|":
            raise _refuse("'$' before the end of an alternative")
        if c == "\\":
            if i + 1 >= len(p):
                raise _refuse("a trailing backslash")
            e = p[i + 1]
            if e == "u" and len(p) >= i + 6 and all(h in "0123456789abcdefABCDEF" for h in p[i + 2:i + 6]):
                body += _literal(chr(int(p[i + 2:i + 6], 16)))
                i += 6
                continue
            if e in _UNSUPPORTED_ESCAPES:
                raise _refuse(f"the escape \\{e}")
            if e == "s":
                body += _WS_CLASS if in_class else f"[{_WS_CLASS}]"
            elif e == "S":
                if in_class:
                    raise _refuse("\\S inside a character class")
                body += f"[^{_WS_CLASS}]"
            else:
                body += c + e
            i += 2
            continue
        if in_class:
            if c == "]":
                in_class = False
            body += c
        elif p.startswith("[\\s\\S]", i):  # any character (what our own complements write)
            body += "[\\s\\S]"
            i += 6
            continue
        elif c == "[":
            in_class = True
            body += c
            if p[i + 1:i + 2] == "^":
                body += "^"
                i += 1
        elif c == "(":
            if p[i + 1:i + 2] == "?" and p[i + 2:i + 3] != ":":
                raise _refuse("a lookaround, named group or flag")
            depth += 1
            body += c
        elif c == ")":
            depth -= 1
            body += c
        elif c == "|" and depth == 0:
            close()
            body, start, end = "", False, False
        elif c == "^":
            if body or depth:
                raise _refuse("'^' inside the pattern")
            start = True
        elif c == "$":
            if depth or (i + 1 < len(p) and p[i + 1] not in "|"):
                raise _refuse("'$' inside the pattern")
            end = True
        elif c == ".":
            body += _DOT
        else:
            body += c
        i += 1
    close()
    return alts


def _unwrap(p: str) -> str:
    """`(?:X)` around the whole pattern is X (our own anyOf of name regexes writes such groups,
    with the anchors inside)."""
    while p.startswith("(?:") and p.endswith(")"):
        depth, i, in_class = 0, 0, False
        while i < len(p):
            c = p[i]
            if c == "\\":
                i += 2
                continue
            if in_class:
                in_class = c != "]"
            elif c == "[":
                in_class = True
            elif c == "(":
                depth += 1
            elif c == ")":
                depth -= 1
                if depth == 0:
                    break
            i += 1
        if i != len(p) - 1:
            return p  # the first group closes before the end: not one group around everything
        p = p[3:-1]
    return p


@lru_cache(maxsize=1024)
def _fsm(p: str) -> Any:
    """The automaton of the strings in which `p` matches somewhere (ECMA search semantics)."""
    if p in _DERIVED:
        return _DERIVED[p]
    anywhere = interegular.parse_pattern("[\\s\\S]*").to_fsm()
    total = None
    for start, body, end in _translate(_unwrap(p)):
        try:
            core = interegular.parse_pattern(body).to_fsm() if body else interegular.parse_pattern("").to_fsm()
        except Exception as exc:  # interegular raises several private types
            raise _refuse(f"{exc}") from exc
        parts = ([] if start else [anywhere]) + [core] + ([] if end else [anywhere])
        fsm = parts[0].concatenate(*parts[1:]) if len(parts) > 1 else core
        total = fsm if total is None else total.union(fsm)
    return total.intersection(anywhere)  # the same strings over an alphabet with every character


def _label(fsm: Any, symbols: set[Any]) -> str:
    """A character class for a set of interegular symbols."""
    chars: dict[Any, list[str]] = {}
    for ch, sym in fsm.alphabet._symbol_mapping.items():
        if ch is not anything_else:
            chars.setdefault(sym, []).append(ch)
    other = fsm.alphabet._symbol_mapping.get(anything_else)
    if other in symbols:
        excluded = sorted(c for sym, cs in chars.items() if sym not in symbols for c in cs)
        return "[^" + "".join(regex_char(c) for c in excluded) + "]" if excluded else "[\\s\\S]"
    included = sorted(c for sym in symbols for c in chars.get(sym, ()))
    return "[" + "".join(regex_char(c) for c in included) + "]"


def _to_regex(fsm: Any) -> str | None:
    """State elimination over the (reduced) automaton; None edges are absent."""
    fsm = fsm.reduce()
    states = sorted(fsm.states)
    edge: dict[tuple[Any, Any], str] = {}
    grouped: dict[tuple[Any, Any], set[Any]] = {}
    for src, moves in fsm.map.items():
        for sym, dst in moves.items():
            grouped.setdefault((src, dst), set()).add(sym)
    live = {s for s in states if fsm.islive(s)}
    for (src, dst), syms in grouped.items():
        if src in live and dst in live:
            edge[(src, dst)] = _label(fsm, syms)
    start, final = "S", "F"
    edge[(start, fsm.initial)] = ""
    for f in fsm.finals:
        edge[(f, final)] = ""
    nodes = [s for s in states if s in live]
    for k in nodes:
        loop = edge.pop((k, k), None)
        star = f"(?:{loop})*" if loop else ""
        ins = [(a, r) for (a, b), r in edge.items() if b == k]
        outs = [(b, r) for (a, b), r in edge.items() if a == k]
        for a, _ in ins:
            del edge[(a, k)]
        for b, _ in outs:
            del edge[(k, b)]
        for a, r1 in ins:
            for b, r2 in outs:
                new = r1 + star + r2
                old = edge.get((a, b))
                edge[(a, b)] = new if old is None else f"(?:{old}|{new})"
                if len(edge[(a, b)]) > MAX_REGEX:
                    raise _refuse(f"its complement needs a regex over {MAX_REGEX} characters")
    body = edge.get((start, final))
    return None if body is None else f"(?:{body})"


_COMPLEMENTS: dict[str, str | None | Unsupported] = {}  # a refusal is remembered too: it can be slow


def complement_pattern(p: str) -> str | None:
    """An anchored regex matching exactly the strings in which `p` matches nowhere (None when
    `p` matches in every string)."""
    if not isinstance(p, str):
        raise _refuse("not a string")
    if p in NOT_IN_WORDS:  # "none of these words": its complement is the words
        return words_pattern(list(NOT_IN_WORDS[p])) if NOT_IN_WORDS[p] else None
    if len(p) > MAX_PATTERN:
        raise _refuse(f"a pattern over {MAX_PATTERN} characters (its automaton takes seconds to complement)")
    if p not in _COMPLEMENTS:
        if len(_COMPLEMENTS) > 1024:
            _COMPLEMENTS.clear()
        try:
            body = _to_regex(_fsm(p).everythingbut())
            _COMPLEMENTS[p] = None if body is None else f"^{body}$"
        except Unsupported as exc:
            _COMPLEMENTS[p] = exc
    found = _COMPLEMENTS[p]
    if isinstance(found, Unsupported):
        raise found
    return found


MAX_PROOF_PATTERN = 200  # longer patterns are not intersected for proofs (automata grow fast)
# Regexes pattern_parts wrote from automata, with those automata: proofs over them need no parse
# (what schema_meet's key classes are, met again with a third allOf member), whatever their length.
_DERIVED: dict[str, Any] = {}
_MAX_DERIVED = 256


def _too_long(p: str) -> bool:
    return len(p) > MAX_PROOF_PATTERN and p not in _DERIVED


def _written(fsm: Any) -> str | None:
    """The anchored regex of an automaton's strings (None: no string), remembered with it."""
    body = _to_regex(fsm)
    if body is None:
        return None
    if len(_DERIVED) >= _MAX_DERIVED:
        _DERIVED.clear()
    _DERIVED[f"^{body}$"] = fsm
    return f"^{body}$"


def _proved_empty(p: str, q: str, combine: str) -> bool:
    """Whether `combine` ("intersection" / "difference") of the two patterns' automata is empty:
    False where it is not proved (a pattern too long or not taken)."""
    if _too_long(p) or _too_long(q):
        return False
    try:
        return bool(getattr(_fsm(p), combine)(_fsm(q)).empty())
    except Unsupported:
        return False


@lru_cache(maxsize=4096)
def patterns_disjoint(p: str, q: str) -> bool:
    """True only when no string matches both patterns (False when either is not taken)."""
    return _proved_empty(p, q, "intersection")


def pattern_within(p: str, q: str) -> bool:
    """True only when every string `p` matches, `q` matches too (False when either is not taken)."""
    return _proved_empty(p, q, "difference")


@lru_cache(maxsize=4096)
def pattern_matches(p: str, s: str) -> bool | None:
    """Whether pattern `p` matches somewhere in `s`; None when `p` is not taken."""
    if p in NOT_IN_WORDS:
        return s not in NOT_IN_WORDS[p]
    if _too_long(p):
        return None
    try:
        return bool(_fsm(p).accepts(s))
    except Unsupported:
        return None


def pattern_without(p: str, words: tuple[str, ...]) -> str | None:
    """An anchored regex matching exactly the strings in which `p` matches, except `words`
    (None when no string is left)."""
    if len(p) > MAX_PROOF_PATTERN:
        raise _refuse(f"a pattern over {MAX_PROOF_PATTERN} characters")
    listed = interegular.parse_pattern("|".join(_literal_word(w) for w in words)).to_fsm()
    body = _to_regex(_fsm(p).difference(listed))
    return None if body is None else f"^{body}$"


def _literal_word(w: str) -> str:
    return "".join(_literal(c) for c in w) if w else "()"


def pattern_parts(p: str, q: str) -> tuple[str | None, str | None, str | None]:
    """Anchored regexes for the strings matched by `p` only, by both, and by `q` only (None where
    no string is); how two overlapping patternProperties become disjoint ones."""
    for x in (p, q):
        if _too_long(x):
            raise _refuse(f"a pattern over {MAX_PROOF_PATTERN} characters")
    fp, fq = _fsm(p), _fsm(q)
    return _written(fp.difference(fq)), _written(fp.intersection(fq)), _written(fq.difference(fp))


def pattern_cells(ps: list[str], qs: list[str]) -> tuple[list[list[str | None]], list[str | None], list[str | None]]:
    """Anchored regexes (None: no string) for the keys two pattern lists split into: p_i and q_j,
    p_i and no q, q_j and no p (the unions taken on the automata, not on the text)."""
    if any(_too_long(x) for x in (*ps, *qs)):
        raise _refuse(f"a pattern over {MAX_PROOF_PATTERN} characters")
    fps, fqs = [_fsm(p) for p in ps], [_fsm(q) for q in qs]
    any_p, any_q = fps[0].union(*fps[1:]), fqs[0].union(*fqs[1:])
    return ([[_written(fp.intersection(fq)) for fq in fqs] for fp in fps], [_written(fp.difference(any_q)) for fp in fps],
            [_written(fq.difference(any_p)) for fq in fqs])


def pattern_words(p: str, limit: int = 64) -> list[str]:
    """Every string in which `p` matches, when those are at most `limit` (an anchored pattern
    of literal alternatives, as propertyNames' `enum` becomes); Unsupported otherwise."""
    if len(p) > MAX_PROOF_PATTERN:
        raise _refuse(f"a pattern over {MAX_PROOF_PATTERN} characters")
    return _words(_fsm(p), limit)


def unmatched_words(patterns: list[str], limit: int = 64) -> list[str]:
    """Every string that none of `patterns` matches, when those are at most `limit` (what
    propertyNames' `not: {enum}` leaves); Unsupported otherwise."""
    if any(len(p) > MAX_PROOF_PATTERN for p in patterns):
        raise _refuse(f"a pattern over {MAX_PROOF_PATTERN} characters")
    anywhere = interegular.parse_pattern("[\\s\\S]*").to_fsm()
    fsm = anywhere
    for p in patterns:
        fsm = fsm.difference(_fsm(p))
    return _words(fsm, limit)


def _words(fsm: Any, limit: int) -> list[str]:
    fsm = fsm.reduce()
    try:
        if fsm.cardinality() > limit:
            raise _refuse(f"it matches over {limit} strings")
    except OverflowError as exc:
        raise _refuse("it matches infinitely many strings") from exc
    chars: dict[Any, list[str]] = {}
    for ch, sym in fsm.alphabet._symbol_mapping.items():
        chars.setdefault(sym, []).append(ch)
    words: list[str] = []

    def walk(state: Any, prefix: str) -> None:
        if state in fsm.finals:
            words.append(prefix)
        for sym, dst in fsm.map.get(state, {}).items():
            if not fsm.islive(dst):
                continue
            for ch in chars.get(sym, ()):
                if ch is anything_else:  # stands for every other character
                    raise _refuse("it matches infinitely many strings")
                walk(dst, prefix + ch)
            if len(words) > limit:
                raise _refuse(f"it matches over {limit} strings")

    walk(fsm.initial, "")
    return words
