"""ECMA-262 identity escapes that the backend's regex syntax reads as something else.

JSON Schema patterns are ECMA-262 regexes, where `\\<` and `\\>` are identity escapes: the
characters `<` and `>` (ECMA has no word-start/word-end assertions; Python's `re`, which
`jsonschema` uses, reads them the same way). llguidance parses patterns with Rust's
regex-syntax, where `\\<` and `\\>` are word-start/word-end assertions (which it then refuses as
lookarounds: JsonSchemaStore---proxies `^\\<ProxyName\\>$`). Spelling them as the plain
characters keeps the pattern's language and lets the backend take it. Every other escaped ASCII
punctuation character already means itself to the backend (checked one by one on llguidance).
"""

from __future__ import annotations

from typing import Any

# ECMA identity escape -> the same character, written as the backend reads it literally
_LITERAL = {"<": "<", ">": ">"}


def ecma_escapes(p: Any) -> Any:
    """`p` with `\\<` and `\\>` written as `<` and `>` (inside classes too, where they are the same
    characters); anything that is not a string is returned as is."""
    if not isinstance(p, str) or "\\" not in p:
        return p
    out, i = [], 0
    while i < len(p):
        if p[i] == "\\" and i + 1 < len(p):
            pair = p[i:i + 2]
            out.append(_LITERAL.get(pair[1], pair))
            i += 2
            continue
        out.append(p[i])
        i += 1
    return "".join(out)
