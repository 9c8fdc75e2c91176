"""xgrammar backend (the measured alternative to llguidance; selectable, not the default).

Pushdown automaton with a precomputed adaptive token-mask cache: fast masks, slower compiles.
"""

from __future__ import annotations

import json
import threading
from typing import Any

import torch
import xgrammar

from ..base import Grammar, Matcher
from ..errors import GrammarCompileError, UnsupportedSchemaError
from ..vocab import TokenizerInfo

NAME = "xgrammar"
_COMPILERS: dict[str, Any] = {}
_TINFOS: dict[str, Any] = {}
_LOCK = threading.Lock()


def _compiler(info: TokenizerInfo) -> Any:
    with _LOCK:
        comp = _COMPILERS.get(info.fingerprint)
        if comp is None:
            comp = _COMPILERS[info.fingerprint] = xgrammar.GrammarCompiler(
                _tokenizer_info(info), max_threads=1, cache_enabled=False
            )
        return comp


class XGrammarGrammar(Grammar):
    backend = NAME

    def __init__(self, info: TokenizerInfo, kind: str, spec: str, compiled: Any) -> None:
        self.info, self.kind, self.spec, self.compiled = info, kind, spec, compiled
        self.words = (info.vocab_size + 31) // 32

    def matcher(self, family: int = 0) -> XGrammarMatcher:
        return XGrammarMatcher(self, xgrammar.GrammarMatcher(self.compiled), 0)

    def payload(self) -> Any:
        return (self.kind, self.spec, self.compiled.serialize_json())

    @staticmethod
    def from_payload(info: TokenizerInfo, payload: Any) -> XGrammarGrammar:
        kind, spec, data = payload
        compiled = xgrammar.CompiledGrammar.deserialize_json(data, _tokenizer_info(info))
        return XGrammarGrammar(info, kind, spec, compiled)


def _tokenizer_info(info: TokenizerInfo) -> Any:
    tinfo = _TINFOS.get(info.fingerprint)
    if tinfo is None:
        tinfo = _TINFOS[info.fingerprint] = xgrammar.TokenizerInfo.from_huggingface(
            info.hf_tokenizer, vocab_size=info.vocab_size, stop_token_ids=list(info.end_token_ids)
        )
    return tinfo


class XGrammarMatcher(Matcher):
    __slots__ = ("grammar", "_m", "_n")

    def __init__(self, grammar: XGrammarGrammar, m: Any, n: int) -> None:
        self.grammar, self._m, self._n = grammar, m, n

    @property
    def num_tokens(self) -> int:
        return self._n

    def fill_next_token_bitmask(self, bitmask: torch.Tensor, index: int = 0) -> None:
        row = bitmask[index]
        words = self.grammar.words
        if self._m.is_terminated():
            row.zero_()
            return
        self._m.fill_next_token_bitmask(bitmask[:, :words] if bitmask.shape[1] > words else bitmask, index)
        if row.shape[0] > words:
            row[words:] = 0

    def advance(self, token_id: int) -> bool:
        if self._m.is_terminated() or not self._m.accept_token(token_id):
            return False
        self._n += 1
        return True

    def rollback(self, n_tokens: int) -> None:
        self._check_rollback(n_tokens)
        if n_tokens:
            self._m.rollback(n_tokens)
            self._n -= n_tokens

    def is_accepting(self) -> bool:
        return self._m.is_terminated() or self._m.is_completed()

    def is_terminated(self) -> bool:
        if self._m.is_terminated():
            return True
        if not self._m.is_completed():
            return False
        row = torch.zeros((1, self.grammar.words), dtype=torch.int32)
        self._m.fill_next_token_bitmask(row, 0)
        for tid in self.grammar.info.end_token_ids:
            row[0, tid >> 5] &= ~(1 << (tid & 31))
        return not bool(row.any())

    def forced_bytes(self) -> bytes:
        if self.is_accepting():
            return b""
        return self._m.find_jump_forward_string().encode("utf-8")

    def copy(self) -> XGrammarMatcher:
        return XGrammarMatcher(self.grammar, self._m.fork(), self._n)


def _wrap(kind: str, spec: str, info: TokenizerInfo, fn: Any) -> XGrammarGrammar:
    try:
        return XGrammarGrammar(info, kind, spec, fn())
    except (RuntimeError, ValueError) as exc:
        raise GrammarCompileError(f"{kind}: {str(exc).splitlines()[0] if str(exc) else exc}") from exc


# xgrammar 0.2.9 accepted instances the official JSON-Schema suite marks invalid (minLength or
# pattern without "type", patternProperties, oneOf/allOf, every format we tried), so its JSON
# path is off: regex, EBNF and choices stay. benchmarks/constrained.py flips this to measure.
JSON_SCHEMA_ENABLED = False


def compile_json_schema(info: TokenizerInfo, schema: Any, canonical: str, whitespace_max: int) -> XGrammarGrammar:
    if not JSON_SCHEMA_ENABLED:
        raise UnsupportedSchemaError("schema", "#", "the xgrammar backend is not sound for JSON schema "
                                     "(see constrained/README.md); use llguidance")
    comp = _compiler(info)
    return _wrap("json_schema", canonical, info, lambda: comp.compile_json_schema(
        json.dumps(schema), any_whitespace=True, max_whitespace_cnt=whitespace_max, strict_mode=False))


def compile_regex(info: TokenizerInfo, regex: str, kind: str = "regex") -> XGrammarGrammar:
    return _wrap(kind, regex, info, lambda: _compiler(info).compile_regex(regex))


def compile_ebnf(info: TokenizerInfo, text: str) -> XGrammarGrammar:
    return _wrap("ebnf", text, info, lambda: _compiler(info).compile_grammar(text))


def compile_choices(info: TokenizerInfo, choices: list[str], canonical: str) -> XGrammarGrammar:
    ebnf = "root ::= " + " | ".join(json.dumps(c, ensure_ascii=False) for c in choices)
    return _wrap("choices", canonical, info, lambda: _compiler(info).compile_grammar(ebnf))
