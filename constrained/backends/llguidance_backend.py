"""llguidance backend: lazy Earley parser + derivative-based lexer over the token trie.

Compiles in about a millisecond (no precomputed per-state token tables), handles recursion,
large repetition bounds and context-free grammars, and computes a mask in tens of µs.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import llguidance
import llguidance.hf
import torch

from ..base import Grammar, Matcher
from ..errors import GrammarCompileError
from ..vocab import TokenizerInfo

if TYPE_CHECKING:
    from ..mask_workers import MaskWorkers

NAME = "llguidance"

_TOKENIZERS: dict[tuple[str, int], Any] = {}
_TOK_LOCK = threading.Lock()


def parser_limits() -> llguidance.LLParserLimits:
    """Tighter than the defaults so one hostile grammar cannot stall the decode loop."""
    return llguidance.LLParserLimits(
        max_items_in_row=2000, initial_lexer_fuel=1_000_000, step_lexer_fuel=200_000,
        step_max_items=50_000, max_lexer_states=50_000, max_grammar_size=200_000,
    )


def _lltokenizer(info: TokenizerInfo, family: int = 0) -> Any:
    """Building the token trie costs ~0.4 s, so one per tokenizer fingerprint; matcher families
    past the first get their own copy (the same slices, ~0.2-0.4 s), so that no parser state
    hangs off one object shared by every mask thread."""
    tok = _TOKENIZERS.get((info.fingerprint, family))  # built: no lock (another may be building)
    if tok is not None:
        return tok
    base = None if family == 0 else _lltokenizer(info, 0)
    with _TOK_LOCK:
        tok = _TOKENIZERS.get((info.fingerprint, family))
        if tok is None:
            if base is None:
                tok = llguidance.hf.from_tokenizer(
                    info.hf_tokenizer, n_vocab=info.vocab_size, eos_token=list(info.end_token_ids)
                )
            else:
                tok = base.with_slices(llguidance.LLTokenizer.general_slices())  # from_tokenizer's default
            _TOKENIZERS[(info.fingerprint, family)] = tok
        return tok


def prepare_tokenizer(info: TokenizerInfo) -> None:
    """Family 0's token trie (0.6-1.7 s on the 2-core VM, native code holding the GIL): built at the
    scheduler's start-up (runtime/grammar_warmup.py), not by the first grammar beside the loop."""
    _lltokenizer(info, 0)


def prepare_families(info: TokenizerInfo, count: int) -> None:
    """The tokenizer copies of matcher families 1..count-1 (~0.2-0.4 s each, the GIL released):
    GrammarRuntime builds them in the background while the first grammar compiles."""
    for family in range(1, count):
        _lltokenizer(info, family)


def json_options(whitespace_max: int) -> dict[str, Any]:
    return {
        "whitespace_flexible": True,
        "whitespace_pattern": rf"[\x20\x0A\x0D\x09]{{0,{whitespace_max}}}",
        "coerce_one_of": False,  # oneOf only when branches are provably disjoint
        "json_allow_general_unicode_escapes": True,  # \uXXXX where no pattern/format applies
        "lenient": False,
    }


class LLGuidanceGrammar(Grammar):
    backend = NAME

    def __init__(self, info: TokenizerInfo, kind: str, spec: str, ll_grammar: str) -> None:
        self.info, self.kind, self.spec = info, kind, spec
        self.ll_grammar = ll_grammar
        self._template = self._build(0)
        if self._template.is_error():
            raise GrammarCompileError(f"{kind}: {self._template.get_error()}")
        self._families = [self._template]
        self._warmed = 0  # families whose template computed its start mask (`prepare_families`)
        self._words = (info.vocab_size + 31) // 32

    def _build(self, family: int) -> Any:
        return llguidance.LLMatcher(_lltokenizer(self.info, family), self.ll_grammar, log_level=0,
                                    limits=parser_limits())

    def matcher(self, family: int = 0) -> LLGuidanceMatcher:
        """A deep copy of the family's template. Deep copies share the template's lexer cache
        (a mask costs ~2.5x the CPU in a matcher built apart), and so whatever guards it: rows of
        one family do not fill in parallel (benchmarks/grammar_host.py). A family's template (on
        its own tokenizer copy) is built on first use."""
        if family < 0:
            raise ValueError(f"family must be >= 0, got {family}")
        self.prepare_families(family + 1)
        return LLGuidanceMatcher(self, self._families[family].deep_copy(), 0, False, family)

    def prepare_families(self, count: int) -> None:
        """Families 0..count-1 built, each template with its start mask computed once: a deep copy
        of a template that never computed a mask pays the grammar's first mask itself (lexer and
        parser states built: 40-130 ms for a 4,000-key schema on the 2-core VM), one that did pays
        ~0.3 ms. The compile service calls this on its build thread (the native call releases the
        GIL), so a new grammar's first masks are not computed on the scheduler's loop."""
        while len(self._families) < count:  # the first grammar of a tokenizer also copies the tokenizer
            self._families.append(self._build(len(self._families)))
        while self._warmed < len(self._families):
            scratch = torch.empty(self._words, dtype=torch.int32)
            self._families[self._warmed].unsafe_compute_mask_ptr(scratch.data_ptr(), self._words * 4)
            self._warmed += 1

    def payload(self) -> Any:
        return (self.kind, self.spec, self.ll_grammar)

    @staticmethod
    def from_payload(info: TokenizerInfo, payload: Any) -> LLGuidanceGrammar:
        return LLGuidanceGrammar(info, *payload)


class LLGuidanceMatcher(Matcher):
    __slots__ = ("grammar", "_m", "_n", "_ended", "family")

    def __init__(self, grammar: LLGuidanceGrammar, m: Any, n: int, ended: bool, family: int = 0) -> None:
        self.grammar, self._m, self._n, self._ended, self.family = grammar, m, n, ended, family

    @property
    def num_tokens(self) -> int:
        return self._n

    def fill_next_token_bitmask(self, bitmask: torch.Tensor, index: int = 0) -> None:
        row = bitmask[index]
        words = self.grammar._words
        if self._ended:
            row.zero_()
            return
        if row.shape[0] < words or not row.is_contiguous() or row.dtype != torch.int32:
            raise ValueError(f"bitmask row must be contiguous int32 with >= {words} words")
        self._m.unsafe_compute_mask_ptr(row.data_ptr(), words * 4)
        if row.shape[0] > words:
            row[words:] = 0

    @classmethod
    def prepare_fill(cls, items: Sequence[tuple[Matcher, int]], bitmask: torch.Tensor,
                     workers: MaskWorkers) -> Callable[[], None]:
        """Every row in Rust with the GIL released: one LLExecutor call ("native"), or slices of
        per-matcher calls on our threads ("threads"); inline and serial with 0 threads."""
        if bitmask.dim() != 2 or bitmask.dtype != torch.int32 or bitmask.device.type != "cpu" or not bitmask.is_contiguous():
            raise ValueError("bitmask must be a contiguous 2-D int32 CPU tensor")
        rows = bitmask.shape[0]
        live: list[tuple[Any, int]] = []
        families: list[int] = []
        ended: list[int] = []
        words = 0
        for m, index in items:
            if not 0 <= index < rows:
                raise IndexError(f"bitmask row {index} out of range for {rows} rows")
            if m._ended:  # type: ignore[attr-defined]
                ended.append(index)
            else:
                live.append((m._m, index))  # type: ignore[attr-defined]
                families.append(m.family)  # type: ignore[attr-defined]
                words = m.grammar._words  # type: ignore[attr-defined]
        if ended:
            bitmask[ended] = 0
        if not live:
            return lambda: None
        if any(m.grammar._words != words for m, _ in items):  # type: ignore[attr-defined]
            raise ValueError("matchers of different tokenizers in one bitmask")
        if bitmask.shape[1] < words:
            raise ValueError(f"bitmask rows must hold >= {words} words")
        # llguidance writes exactly `words` per row: a wider row (model vocab padding) is filled
        # through a scratch of the exact width, then its padding columns cleared.
        target = bitmask if bitmask.shape[1] == words else torch.empty((rows, words), dtype=torch.int32)
        nbytes = words * 4
        live = by_family(live, families)
        if workers.threads > 0 and workers.strategy == "native":  # one GIL round trip per batch
            executor = workers.native(NAME, lambda n: llguidance.LLExecutor(num_threads=n))
            address = target.data_ptr()
            compute = lambda: executor.unsafe_compute_mask_ptr(live, address, nbytes, rows)  # noqa: E731
        else:
            base = target.data_ptr()
            calls = [(m.unsafe_compute_mask_ptr, base + index * nbytes) for m, index in live]

            def fill(chunk: Sequence[tuple[Callable[[int, int], None], int]]) -> None:
                for compute_row, address in chunk:
                    compute_row(address, nbytes)

            compute = lambda: workers.run_chunks(fill, calls)  # noqa: E731
        if target is bitmask:
            return compute
        index_t = torch.tensor([i for _, i in live])

        def fill_padded() -> None:
            compute()
            bitmask[index_t, :words] = target[index_t]
            bitmask[index_t, words:] = 0

        return fill_padded

    @classmethod
    def advance_rows(cls, matchers: Sequence[Matcher], tokens: Sequence[int], workers: MaskWorkers) -> list[bool]:
        """One by one on this thread, whatever the workers: a commit costs ~5 µs a row, and
        llguidance's parallel `consume_token_par` measured no faster at any thread count on the
        H200's 16-core host (batch 256: 6.2 µs/row serial, 6.5-7.4 with 2-15 threads;
        benchmarks/grammar_host.py; in the engine, commit + mask start took 2.4 ms per step with 8
        mask threads against 1.2 ms inline).
        End tokens stay out of llguidance's history (see `advance`)."""
        ok = [False] * len(matchers)
        batch: list[int] = []
        for j, (m, tok) in enumerate(zip(matchers, tokens)):
            if tok in m.grammar.info.end_token_ids or m._ended:
                ok[j] = m.advance(tok)
            else:
                batch.append(j)
        results = [matchers[j]._m.try_consume_tokens([tokens[j]]) == 1 for j in batch]
        for j, good in zip(batch, results):
            if good:
                matchers[j]._n += 1
                ok[j] = True
        return ok

    def advance(self, token_id: int) -> bool:
        if self._ended:
            return False
        if token_id in self.grammar.info.end_token_ids:  # kept out of llguidance's history so
            if not self._m.is_accepting():               # that rollback counts it as one token
                return False
            self._ended = True
        elif self._m.try_consume_tokens([token_id]) != 1:
            return False
        self._n += 1
        return True

    def rollback(self, n_tokens: int) -> None:
        self._check_rollback(n_tokens)
        if n_tokens:
            self._n -= n_tokens
            if self._ended:
                self._ended, n_tokens = False, n_tokens - 1
            if n_tokens:
                self._m.rollback(n_tokens)

    def is_accepting(self) -> bool:
        return self._ended or self._m.is_accepting()

    def is_terminated(self) -> bool:
        return self._ended or self._m.is_stopped()  # stopped: only EOS can follow

    def forced_bytes(self) -> bytes:
        if self._ended or self._m.is_accepting():
            return b""
        return bytes(self._m.compute_ff_bytes())

    def copy(self) -> LLGuidanceMatcher:
        return LLGuidanceMatcher(self.grammar, self._m.deep_copy(), self._n, self._ended, self.family)


def by_family(items: list[Any], families: list[int]) -> list[Any]:
    """Items grouped by family (stable): LLExecutor splits a batch into contiguous runs, one per
    thread, so each thread works on its own family's matchers, not on another's shared cache."""
    if not families or min(families) == max(families):
        return items
    return [item for _, item in sorted(zip(families, items), key=lambda pair: pair[0])]


def compile_json_schema(info: TokenizerInfo, schema: dict[str, Any], canonical: str,
                        whitespace_max: int) -> LLGuidanceGrammar:
    try:
        ll = llguidance.LLMatcher.grammar_from_json_schema(schema, overrides=json_options(whitespace_max))
    except ValueError as exc:
        raise GrammarCompileError(f"json_schema: {exc}") from exc
    return LLGuidanceGrammar(info, "json_schema", canonical, ll)


def json_schema_empty(schema: Any) -> bool:
    """True where llguidance proves the schema accepts nothing (it refuses such a schema as a
    `%json` leaf; an item leaf it proves empty is left out of schema_contains.py's grammar)."""
    try:
        message = llguidance.LLMatcher.validate_grammar(llguidance.LLMatcher.grammar_from_json_schema(schema))
    except ValueError as exc:
        message = str(exc)
    return message.startswith("Unsatisfiable schema")


def compile_lark(info: TokenizerInfo, lark: str, canonical: str) -> LLGuidanceGrammar:
    """A JSON schema rewritten as Lark with `%json` leaves (schema_contains.py)."""
    try:
        ll = llguidance.LLMatcher.grammar_from_lark(lark)
    except ValueError as exc:
        raise GrammarCompileError(f"json_schema: {exc}") from exc
    return LLGuidanceGrammar(info, "json_schema", canonical, ll)


def compile_regex(info: TokenizerInfo, regex: str, kind: str = "regex") -> LLGuidanceGrammar:
    return LLGuidanceGrammar(info, kind, regex, llguidance.LLMatcher.grammar_from_regex(regex))


def compile_ebnf(info: TokenizerInfo, text: str) -> LLGuidanceGrammar:
    """GBNF (`root ::= ...`, llama.cpp style) or Lark (`start: ...`) text."""
    try:
        ll = llguidance.grammar_from("ebnf", text)
    except ValueError as exc:
        raise GrammarCompileError(f"ebnf: {exc}") from exc
    return LLGuidanceGrammar(info, "ebnf", text, ll)


def compile_choices(info: TokenizerInfo, choices: list[str], canonical: str) -> LLGuidanceGrammar:
    lark = "start: " + " | ".join(json.dumps(c, ensure_ascii=False) for c in choices)
    return LLGuidanceGrammar(info, "choices", canonical, llguidance.LLMatcher.grammar_from_lark(lark))
