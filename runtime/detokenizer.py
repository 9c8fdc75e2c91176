"""Incremental detokenization that never emits a broken UTF-8 character, plus stop-string trimming."""
from __future__ import annotations

from typing import Any

_REPLACEMENT = "\ufffd"


class IncrementalDetokenizer:
    """Decodes a growing token list; each call returns only the new, complete text."""

    def __init__(self, tokenizer: Any, skip_special_tokens: bool = True, spaces_between_special_tokens: bool = True) -> None:
        self.tokenizer = tokenizer
        self.kwargs = {"skip_special_tokens": skip_special_tokens}
        if not spaces_between_special_tokens:
            self.kwargs["spaces_between_special_tokens"] = False
        self.ids: list[int] = []
        self.text = ""
        self._prefix_offset = 0
        self._read_offset = 0

    def _decode(self, ids: list[int]) -> str:
        if self.tokenizer is None:  # --skip-tokenizer-init
            return ""
        try:
            return self.tokenizer.decode(ids, **self.kwargs)
        except TypeError:  # tokenizers without spaces_between_special_tokens
            return self.tokenizer.decode(ids, skip_special_tokens=self.kwargs["skip_special_tokens"])

    def add(self, new_ids: list[int], final: bool = False) -> str:
        self.ids.extend(new_ids)
        prefix_text = self._decode(self.ids[self._prefix_offset : self._read_offset])
        full = self._decode(self.ids[self._prefix_offset :])
        if len(full) > len(prefix_text) and (final or not full.endswith(_REPLACEMENT)):
            delta = full[len(prefix_text) :]
            # The previous read window stays as left context so merges (leading spaces) decode right.
            self._prefix_offset = self._read_offset
            self._read_offset = len(self.ids)
            self.text += delta
            return delta
        return ""


def stop_holdback(text: str, stops: tuple[str, ...]) -> int:
    """Characters at the end of `text` that could still grow into a stop string: hold them back
    while streaming so a stop string never leaks."""
    best = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:k]):
                best = k
                break
    return best


def trim_at_stop(text: str, matched: str) -> str:
    pos = text.find(matched)
    return text if pos < 0 else text[:pos]
