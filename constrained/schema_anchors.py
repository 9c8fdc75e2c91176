"""Patterns with `^`/`$` inside groups, rewritten without them (llguidance refuses such anchors).

`^(/?(\\.{2}|[a-z0-9-]*)($|/))*$` says "each segment ends at the end of the string or with
'/'". Anchors are zero-width assertions: `^` holds only at position 0, `$` only at the end
(ECMA-262 without the multiline flag). We read each as a private character (B, E) in the
pattern's automaton (interegular), keep the matched words of the form B* w E* (an anchor after a
character, or before one, never holds), drop the anchors, and add the unanchored sides back:

    strings where the pattern matches = Σ* L(w) Σ*  ∪  L(B+w) Σ*  ∪  Σ* L(wE+)  ∪  L(B+wE+)
                                        (∪ {""} when a word of anchors only matches: `(a|$)(b|^)`)

which becomes one anchored regex by state elimination. Exact for the ECMA syntax that
schema_pattern_complement reads (lookarounds, backreferences, \\b... are refused there).
"""

from __future__ import annotations

from typing import Any

import interegular
from interegular.fsm import FSM

from .schema_negation import Unsupported
from .schema_pattern_complement import MAX_PROOF_PATTERN, _to_regex, _translate

_B, _E = "\ue000", "\ue001"  # private-use characters standing for `^` and `$`


def has_inner_anchor(p: str) -> bool:
    """True when `p` has `^` or `$` (outside classes, unescaped) that is not simply at the start
    or end of a top-level alternative."""
    try:
        _translate(p)
    except Unsupported as exc:
        return "inside the pattern" in exc.reason or "before the end" in exc.reason
    return False


def _sentinels(p: str) -> str:
    """`p` with its anchors as the private characters (escapes and classes kept)."""
    out, i, in_class = [], 0, False
    while i < len(p):
        c = p[i]
        if c == "\\":
            out.append(p[i:i + 2])
            i += 2
            continue
        if in_class:
            in_class = c != "]"
        elif c == "[":
            in_class = True
            if p[i + 1:i + 2] == "^":
                out.append("[^")
                i += 2
                continue
        elif c in "^$":
            c = _B if c == "^" else _E
        out.append(c)
        i += 1
    return "".join(out)


def _with(fsm: FSM, initial: Any = None, finals: Any = None) -> FSM:
    return FSM(fsm.alphabet, fsm.states, fsm.initial if initial is None else initial,
               fsm.finals if finals is None else finals, fsm.map, __no_validation__=True)


def _runs(fsm: FSM, start: Any, symbol: Any) -> set[Any]:
    """States reached from `start` by one or more `symbol`s."""
    out, state = set(), start
    while True:
        state = fsm.map.get(state, {}).get(symbol)
        if state is None or state in out:
            return out
        out.add(state)


def anchor_free(p: str) -> str:
    """An anchored regex with no inner anchors for the strings in which `p` matches."""
    if len(p) > MAX_PROOF_PATTERN:
        raise Unsupported("pattern", f"a pattern with inner anchors over {MAX_PROOF_PATTERN} characters")
    alts = _translate(_sentinels(p))  # no anchors left for it to take; ECMA classes spelled out
    try:
        core = None
        for _, body, _ in alts:
            part = interegular.parse_pattern(body).to_fsm()
            core = part if core is None else core.union(part)
    except Exception as exc:  # interegular raises several private types
        raise Unsupported("pattern", f"pattern {p!r}: {exc}") from exc
    real = interegular.parse_pattern(f"[^{_B}{_E}]*").to_fsm()
    b_star = interegular.parse_pattern(f"{_B}+").to_fsm()
    e_star = interegular.parse_pattern(f"{_E}+").to_fsm()
    only_anchors = interegular.parse_pattern(f"[{_B}{_E}]*").to_fsm()
    empty_matches = not core.intersection(only_anchors).empty()  # at position 0 of "", both hold
    core = core.intersection(real.union(b_star.concatenate(real)).union(real.concatenate(e_star))
                             .union(b_star.concatenate(real, e_star))).reduce()
    mapping = core.alphabet._symbol_mapping
    sym_b, sym_e = mapping.get(_B), mapping.get(_E)
    for sym in (sym_b, sym_e):
        if sym is not None and sum(1 for s in mapping.values() if s == sym) > 1:
            raise Unsupported("pattern", f"pattern {p!r}: an anchor the automaton does not tell apart")
    after_b = [_with(core, initial=s) for s in _runs(core, core.initial, sym_b)] if sym_b is not None else []
    e_finals = frozenset(s for s in core.states if sym_e is not None and _runs(core, s, sym_e) & core.finals)
    plain = core.intersection(real)
    parts = [real.concatenate(plain, real)]
    for f in after_b:
        parts.append(f.intersection(real).concatenate(real))
        parts.append(_with(f, finals=e_finals).intersection(real))
    if e_finals:
        parts.append(real.concatenate(_with(core, finals=e_finals).intersection(real)))
    if empty_matches:
        parts.append(interegular.parse_pattern("").to_fsm())
    total = parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0]
    body = _to_regex(total)
    if body is None:
        raise Unsupported("pattern", f"pattern {p!r} matches no string")
    return f"^{body}$"


def without_inner_anchors(p: Any) -> Any:
    """`p` itself, or its anchor-free form where it has inner anchors and one can be built (else
    `p` is left for the backend to take or refuse)."""
    if not isinstance(p, str) or not has_inner_anchor(p):
        return p
    try:
        return anchor_free(p)
    except Unsupported:
        return p
