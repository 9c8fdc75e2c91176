"""Incremental detokenization that never emits a broken UTF-8 character, plus stop-string trimming.

With a fast (Rust) tokenizer the work is done by `tokenizers`' DecodeStream, ~10x faster per token
than re-decoding a window of ids in Python and identical in text (benchmarks/alt_detokenizer.py,
benchmarks/RESULTS.md); it holds back a character split across tokens, as we must. It has no end:
bytes still pending when the request finishes are flushed here from one full decode, so the
output always equals `tokenizer.decode(all ids)`. Other tokenizers use the windowed decode."""
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
        self._backend, self._stream = _decode_stream(tokenizer, skip_special_tokens)
        self._pending = False  # the stream holds ids it has not turned into text yet

    def _decode(self, ids: list[int]) -> str:
        if self.tokenizer is None:  # --skip-tokenizer-init
            return ""
        try:
            return self.tokenizer.decode(ids, **self.kwargs)
        except TypeError:  # tokenizers without spaces_between_special_tokens
            return self.tokenizer.decode(ids, skip_special_tokens=self.kwargs["skip_special_tokens"])

    def add(self, new_ids: list[int], final: bool = False) -> str:
        if self._stream is not None:
            return self._add_streamed(new_ids, final)
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

    def _add_streamed(self, new_ids: list[int], final: bool) -> str:
        self.ids.extend(new_ids)
        delta = ""
        for token in new_ids:
            chunk = self._stream.step(self._backend, token)
            self._pending = chunk is None
            delta += chunk or ""
        self.text += delta
        if final and self._pending:  # a character cut short: the full decode shows it as U+FFFD
            rest = self._decode(self.ids)[len(self.text) :]
            self.text += rest
            delta += rest
            self._pending = False
        return delta


def _decode_stream(tokenizer: Any, skip_special_tokens: bool) -> tuple[Any, Any]:
    """(the Rust tokenizer, a DecodeStream over it), or (None, None) where the stream would not
    match `tokenizer.decode`: a slow tokenizer, or one that cleans up spaces after decoding."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or getattr(tokenizer, "clean_up_tokenization_spaces", False):
        return None, None
    from tokenizers.decoders import DecodeStream

    return backend, DecodeStream(skip_special_tokens=skip_special_tokens)


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
