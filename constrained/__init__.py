"""Constrained decoding: regex / JSON schema / EBNF / choices -> per-request token matchers.

    grammar = compile(tokenizer, json_schema=schema)      # cached, shared
    m = grammar.matcher()                                 # one per request
    m.fill_next_token_bitmask(bitmask, row); apply_token_bitmask_(logits, bitmask)
    m.advance(sampled_id); m.forced_prefix(); m.rollback(n)
"""

from .base import Grammar, Matcher, fill_next_token_bitmasks
from .bitmask import allocate_token_bitmask, apply_token_bitmask_
from .compiler import BACKENDS, CACHE, DEFAULT_BACKEND, GrammarCache, available_backends, compile, default_backend
from .errors import GrammarCompileError, UnsupportedSchemaError
from .vocab import TokenizerInfo

__all__ = [
    "BACKENDS", "CACHE", "DEFAULT_BACKEND", "Grammar", "GrammarCache", "GrammarCompileError",
    "Matcher", "TokenizerInfo", "UnsupportedSchemaError", "allocate_token_bitmask",
    "apply_token_bitmask_", "available_backends", "compile", "default_backend", "fill_next_token_bitmasks",
]
