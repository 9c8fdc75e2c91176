"""Typed errors for constrained decoding.

Both subclass ValueError so callers that only know "bad request" can catch one type,
while the server can map them to precise 400 messages.
"""

from __future__ import annotations


class GrammarCompileError(ValueError):
    """A spec (regex, schema, EBNF, choices) could not be compiled; says where."""


class UnsupportedSchemaError(GrammarCompileError):
    """A JSON-schema keyword cannot be enforced by the chosen backend.

    Raised instead of silently ignoring the keyword; `compile(..., lenient=True)` drops
    such keywords (the output is then only checked against the enforced subset).
    """

    def __init__(self, keyword: str, path: str, reason: str = "") -> None:
        self.keyword, self.path, self.reason = keyword, path or "#", reason
        msg = f"unsupported JSON-schema keyword {keyword!r} at {self.path}"
        super().__init__(f"{msg}: {reason}" if reason else msg)

    def __reduce__(self) -> tuple[type, tuple[str, str, str]]:
        return (type(self), (self.keyword, self.path, self.reason))  # picklable across processes
