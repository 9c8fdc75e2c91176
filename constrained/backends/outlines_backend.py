"""outlines-core backend: regex -> byte DFA -> per-state token index over the vocabulary.

Masks are table look-ups (cached packed rows per DFA state), so the per-token cost is a
row copy; the price is paid at compile time (states x vocabulary), which grows quickly with
large repetition bounds. Jump-forward walks the same DFA with the single-byte tokens, so a
forced prefix is exactly what the mask would force, one byte at a time.
"""

from __future__ import annotations

import copy
import json
import re
import threading
from typing import Any

import interegular
import outlines_core
import torch
from outlines_core.json_schema import build_regex_from_schema

from ..base import Grammar, Matcher
from ..bitmask import bitmask_width, ids_to_row
from ..errors import GrammarCompileError, UnsupportedSchemaError
from ..schema import CheckedSchema

NAME = "outlines"
_VOCABS: dict[str, Any] = {}
_VOCAB_LOCK = threading.Lock()
_MAX_FORCED = 512


def _vocabulary(info: Any) -> Any:
    with _VOCAB_LOCK:
        vocab = _VOCABS.get(info.fingerprint)
        if vocab is None:
            by_bytes: dict[bytes, list[int]] = {}
            for tid, b in enumerate(info.token_bytes):
                if b:  # None (special/end) and empty tokens never match text
                    by_bytes.setdefault(b, []).append(tid)
            vocab = _VOCABS[info.fingerprint] = outlines_core.Vocabulary(info.eos_token_id, by_bytes)
        return vocab


class OutlinesGrammar(Grammar):
    backend = NAME

    def __init__(self, info: Any, kind: str, spec: str, regex: str, index: Any = None) -> None:
        self.info, self.kind, self.spec, self.regex = info, kind, spec, regex
        if index is None:
            try:
                re.compile(regex)
            except re.error as exc:
                raise GrammarCompileError(f"{kind}: invalid regex at position {exc.pos}: {exc.msg}") from exc
            try:
                index = outlines_core.Index(regex, _vocabulary(info))
            except ValueError as exc:
                raise GrammarCompileError(f"{kind}: outlines-core cannot build a DFA: {exc}") from exc
        self.index = index
        self.initial = index.get_initial_state()
        self.words = bitmask_width(info.vocab_size)
        self._end_row = ids_to_row(info.end_token_ids, self.words)
        self._zero_row = torch.zeros(self.words, dtype=torch.int32)
        self._rows: dict[int, torch.Tensor] = {}
        self._terminal: dict[int, bool] = {}
        self._forced: dict[int, bytes] = {}
        self._scratch = outlines_core.Guide(index, max_rollback=0)
        self._lock = threading.Lock()

    def matcher(self, family: int = 0) -> OutlinesMatcher:
        return OutlinesMatcher(self, [self.initial], [], False)

    def payload(self) -> Any:
        return (self.kind, self.spec, self.regex, self.index)  # Index pickles (Rust serde)

    @staticmethod
    def from_payload(info: Any, payload: Any) -> OutlinesGrammar:
        return OutlinesGrammar(info, *payload)

    def row(self, state: int, path: list[int]) -> torch.Tensor:
        """Packed allowed row for `state`, computed once by replaying `path` on a scratch guide."""
        row = self._rows.get(state)
        if row is None:
            with self._lock:
                guide = self._scratch
                guide.reset()
                for tid in path:
                    guide.advance(tid, False)
                row = torch.empty(self.words, dtype=torch.int32)
                guide.write_mask_into(row.data_ptr(), self.words, 4)
                final = self.index.is_final_state(state)
                self._terminal[state] = final and not bool((row & ~self._end_row).any())
                if final:
                    row |= self._end_row
                self._rows[state] = row
        return row

    def forced(self, state: int) -> bytes:
        hit = self._forced.get(state)
        if hit is not None:
            return hit
        single = self.info.single_byte_tokens
        orphans = self.info.tokens_without_byte_prefix
        out = bytearray()
        cur = state
        if len(orphans) <= 256:  # else too costly to prove nothing else can follow
            while len(out) < _MAX_FORCED and not self.index.is_final_state(cur):
                if any(self.index.get_next_state(cur, t) is not None for t in orphans):
                    break
                nxt = None
                for byte, tid in single.items():
                    found = self.index.get_next_state(cur, tid)
                    if found is not None:
                        if nxt is not None:
                            nxt = None
                            break
                        nxt = (byte, found)
                if nxt is None:
                    break
                out.append(nxt[0])
                cur = nxt[1]
        self._forced[state] = bytes(out)
        return self._forced[state]


class OutlinesMatcher(Matcher):
    __slots__ = ("grammar", "_states", "_tokens", "_ended")

    def __init__(self, grammar: OutlinesGrammar, states: list[int], tokens: list[int], ended: bool) -> None:
        self.grammar, self._states, self._tokens, self._ended = grammar, states, tokens, ended

    @property
    def num_tokens(self) -> int:
        return len(self._tokens)

    def fill_next_token_bitmask(self, bitmask: torch.Tensor, index: int = 0) -> None:
        g = self.grammar
        row = g._zero_row if self._ended else g.row(self._states[-1], self._tokens)
        target = bitmask[index]
        target[: g.words].copy_(row)
        if target.shape[0] > g.words:
            target[g.words:] = 0

    def advance(self, token_id: int) -> bool:
        if self._ended:
            return False
        g = self.grammar
        state = self._states[-1]
        if token_id in g.info.end_token_ids:
            if not g.index.is_final_state(state):
                return False
            self._ended = True
        else:
            nxt = g.index.get_next_state(state, token_id)
            if nxt is None:
                return False
            state = nxt
        self._states.append(state)
        self._tokens.append(token_id)
        return True

    def rollback(self, n_tokens: int) -> None:
        self._check_rollback(n_tokens)
        if n_tokens:
            del self._states[-n_tokens:]
            del self._tokens[-n_tokens:]
            self._ended = False

    def is_accepting(self) -> bool:
        return self._ended or self.grammar.index.is_final_state(self._states[-1])

    def is_terminated(self) -> bool:
        if self._ended:
            return True
        g = self.grammar
        g.row(self._states[-1], self._tokens)
        return g._terminal[self._states[-1]]

    def forced_bytes(self) -> bytes:
        return b"" if self._ended else self.grammar.forced(self._states[-1])

    def copy(self) -> OutlinesMatcher:
        return OutlinesMatcher(self.grammar, list(self._states), list(self._tokens), self._ended)


_META = set("\\.+*?()|[]{}^$")


def escape_literal(text: str) -> str:
    """Escape for the Rust regex dialect (stricter than re.escape about what may be escaped)."""
    return "".join("\\" + c if c in _META else c for c in text)


def compile_regex(info: Any, regex: str, kind: str = "regex", spec: str | None = None) -> OutlinesGrammar:
    return OutlinesGrammar(info, kind, regex if spec is None else spec, regex)


def compile_choices(info: Any, choices: list[str], canonical: str) -> OutlinesGrammar:
    return compile_regex(info, "(" + "|".join(escape_literal(c) for c in choices) + ")", "choices", canonical)


_FORBIDDEN = interegular.parse_pattern(r'[\s\S]*["\\\x00-\x1f][\s\S]*').to_fsm()


def _check_pattern(pattern: str, path: str) -> None:
    """outlines-core splices `pattern` between the quotes verbatim, which is only sound if the
    pattern can never produce a quote, backslash or control character; interegular's FSM
    intersection decides that."""
    body = pattern[1:] if pattern.startswith("^") else pattern
    body = body[:-1] if body.endswith("$") and not body.endswith("\\$") else body
    try:
        fsm = interegular.parse_pattern(body).to_fsm()
    except Exception as exc:  # interegular raises several private types
        raise UnsupportedSchemaError("pattern", path, f"pattern {pattern!r} not supported: {exc}") from exc
    if not (fsm & _FORBIDDEN).empty():
        raise UnsupportedSchemaError("pattern", path, f"pattern {pattern!r} can match '\"', '\\\\' "
                                     "or control characters, which outlines would splice unescaped")


_SAFE_ANY = '[^"\\\\\\x00-\\x1f]*'


def _search_to_match(pattern: str) -> str:
    """JSON-schema patterns search; outlines-core splices them as a full match: pad the
    unanchored ends with any JSON-safe characters."""
    body = pattern[1:] if pattern.startswith("^") else pattern
    end = body.endswith("$") and not body.endswith("\\$")
    body = body[:-1] if end else body
    return ("" if pattern.startswith("^") else _SAFE_ANY) + f"(?:{body})" + ("" if end else _SAFE_ANY)


def _walk_patterns(node: Any, path: str) -> None:
    """Check and rewrite every string `pattern` in place (the vetted schema is our own copy),
    and refuse the shapes outlines-core 0.2.14 silently loosens (found by the official suite)."""
    if isinstance(node, dict):
        if "$ref" in node and set(node) - {"$ref", "$defs", "definitions"}:
            raise UnsupportedSchemaError("$ref", path, "outlines-core ignores keywords next to $ref")
        if isinstance(node.get("items"), bool):
            raise UnsupportedSchemaError("items", path, "outlines-core ignores boolean items")
        for key, value in node.items():
            if key == "pattern" and isinstance(value, str):
                _check_pattern(value, path)
                node[key] = _search_to_match(value)
            elif key != "enum" and key != "const":
                _walk_patterns(value, f"{path}/{key}")
    elif isinstance(node, list):
        for i, value in enumerate(node):
            _walk_patterns(value, f"{path}/{i}")


def compile_json_schema(info: Any, checked: CheckedSchema, whitespace_max: int) -> OutlinesGrammar:
    schema = copy.deepcopy(checked.schema)
    _walk_patterns(schema, "")
    try:
        regex = build_regex_from_schema(
            json.dumps(schema), whitespace_pattern=f"[ \\t\\n\\r]{{0,{whitespace_max}}}"
        )
    except (ValueError, TypeError) as exc:
        raise UnsupportedSchemaError("schema", "#", f"outlines-core: {str(exc).splitlines()[0]}") from exc
    return OutlinesGrammar(info, "json_schema", checked.canonical, regex)
