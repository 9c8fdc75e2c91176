"""Token-level view of a tokenizer: the exact bytes each token produces.

Grammars work on bytes, tokenizers on ids. Byte-level BPE tokens are stored as the GPT-2
"printable unicode" spelling of their bytes ('Ġ' is a space), SentencePiece byte-fallback
tokens as '<0xAB>' and '▁' for spaces, so we decode per tokenizer family once and cache it.
"""

from __future__ import annotations

import hashlib
import json
import threading
import weakref
from dataclasses import dataclass, field
from typing import Any

# End-of-generation spellings used by common chat models; any of them present as a special
# token also ends generation (EOS is allowed exactly in accepting states).
_END_TOKEN_NAMES = frozenset({
    "<|endoftext|>", "<|im_end|>", "<|eot_id|>", "<|end_of_text|>", "<|eom_id|>", "</s>",
    "<|end|>", "<end_of_turn>", "<|return|>",
})


def _gpt2_unicode_to_byte() -> dict[str, int]:
    """Inverse of GPT-2's bytes_to_unicode: printable bytes map to themselves, the rest to 256+n."""
    printable = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    table = {chr(b): b for b in printable}
    extra = 0
    for b in range(256):
        if b not in printable:
            table[chr(256 + extra)] = b
            extra += 1
    return table


def _decoder_kind(hf_tokenizer: Any) -> str:
    backend = getattr(hf_tokenizer, "backend_tokenizer", None)
    if backend is None:
        return "sentencepiece" if hasattr(hf_tokenizer, "sp_model") else "plain"
    decoder = json.loads(backend.to_str()).get("decoder") or {}
    kinds = [decoder.get("type")] + [d.get("type") for d in decoder.get("decoders", [])]
    if "ByteLevel" in kinds:
        return "byte_level"
    if "ByteFallback" in kinds or "Metaspace" in kinds:
        return "sentencepiece"
    return "plain"


def _token_to_bytes(text: str, kind: str, byte_map: dict[str, int]) -> bytes | None:
    if kind == "byte_level":
        try:
            return bytes(byte_map[c] for c in text)
        except KeyError:  # an added plain-text token inside a byte-level vocab
            return text.encode("utf-8")
    if kind == "sentencepiece":
        if len(text) == 6 and text.startswith("<0x") and text.endswith(">"):
            return bytes([int(text[3:5], 16)])
        return text.replace("\u2581", " ").encode("utf-8")
    return text.encode("utf-8")


@dataclass(frozen=True, eq=False)
class TokenizerInfo:
    """What grammar backends need to know about a tokenizer; built once per tokenizer."""

    vocab_size: int
    token_bytes: tuple[bytes | None, ...]  # None: special token, never produced by a grammar
    eos_token_id: int
    end_token_ids: tuple[int, ...]
    fingerprint: str  # identity for caches: same vocabulary and end tokens => same grammars
    kind: str
    hf_tokenizer: Any = field(repr=False, default=None)

    @property
    def single_byte_tokens(self) -> dict[int, int]:
        """byte -> token id spelling exactly that byte (jump-forward walks the DFA with these)."""
        found = self.__dict__.get("_single")
        if found is None:
            found = {}
            for tid, b in enumerate(self.token_bytes):
                if b is not None and len(b) == 1 and b[0] not in found:
                    found[b[0]] = tid
            object.__setattr__(self, "_single", found)
        return found

    @property
    def tokens_without_byte_prefix(self) -> tuple[int, ...]:
        """Tokens whose first byte has no single-byte token (usually none for byte-level BPE).

        A byte-by-byte DFA walk cannot see them, so jump-forward must check them explicitly.
        """
        found = self.__dict__.get("_orphans")
        if found is None:
            single = self.single_byte_tokens
            found = tuple(t for t, b in enumerate(self.token_bytes) if b and b[0] not in single)
            object.__setattr__(self, "_orphans", found)
        return found

    @staticmethod
    def from_tokenizer(hf_tokenizer: Any, extra_end_token_ids: tuple[int, ...] = ()) -> TokenizerInfo:
        """Cached per tokenizer object: decoding 50-150k tokens costs tens of milliseconds."""
        if isinstance(hf_tokenizer, TokenizerInfo):
            return hf_tokenizer
        key = (id(hf_tokenizer), tuple(extra_end_token_ids))
        with _LOCK:
            hit = _BY_OBJECT.get(key)
            if hit is not None and hit[0]() is hf_tokenizer:
                return hit[1]
        info = _build(hf_tokenizer, tuple(extra_end_token_ids))
        with _LOCK:
            try:
                ref = weakref.ref(hf_tokenizer)
            except TypeError:
                ref = lambda obj=hf_tokenizer: obj  # noqa: E731 - unweakrefable: keep alive
            _BY_OBJECT[key] = (ref, info)
        return info


_LOCK = threading.Lock()
_BY_OBJECT: dict[tuple[int, tuple[int, ...]], tuple[Any, TokenizerInfo]] = {}


def _build(hf_tokenizer: Any, extra_end: tuple[int, ...]) -> TokenizerInfo:
    vocab: dict[str, int] = hf_tokenizer.get_vocab()
    size = max(len(hf_tokenizer), max(vocab.values()) + 1)
    special: set[int] = set(getattr(hf_tokenizer, "all_special_ids", []) or [])
    added = getattr(hf_tokenizer, "get_added_vocab", None)
    if added is not None:
        special |= set(added().values())
    kind = _decoder_kind(hf_tokenizer)
    byte_map = _gpt2_unicode_to_byte()
    table: list[bytes | None] = [None] * size
    for text, tid in vocab.items():
        if tid not in special:
            table[tid] = _token_to_bytes(text, kind, byte_map)
    eos = hf_tokenizer.eos_token_id
    if eos is None:
        raise ValueError("tokenizer has no eos_token_id; constrained decoding needs one")
    ends = {eos, *extra_end}
    ends |= {tid for text, tid in vocab.items() if tid in special and text in _END_TOKEN_NAMES}
    for tid in ends:
        table[tid] = None
    digest = hashlib.sha256()
    digest.update(f"{kind}|{size}|{eos}|{sorted(ends)}".encode())
    for tid, b in enumerate(table):
        digest.update(b"\x00" if b is None else b"\x01" + len(b).to_bytes(2, "little") + b)
    return TokenizerInfo(
        vocab_size=size, token_bytes=tuple(table), eos_token_id=eos,
        end_token_ids=tuple(sorted(ends)), fingerprint=digest.hexdigest()[:32], kind=kind,
        hf_tokenizer=hf_tokenizer,
    )
