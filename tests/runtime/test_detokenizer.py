"""IncrementalDetokenizer: streamed deltas never hold half a character and add up to the full decode,
on the default model's byte-level tokenizer (the DecodeStream path) and through the windowed path."""
from __future__ import annotations

import random

import pytest

from radixlm.runtime.detokenizer import IncrementalDetokenizer, stop_holdback, trim_at_stop

TEXTS = ["Hello world, streaming text.", "北京是中国的首都。漢字とかな", "family 👨‍👩‍👧‍👦 flags 🇫🇷 👍🏽 e\u0301",
         "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nok 🙂<|im_end|>"]


@pytest.fixture(scope="module")
def tokenizer(default_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(default_model_dir))


def stream(tok, ids: list[int], skip: bool, windowed: bool, step: int = 1) -> tuple[IncrementalDetokenizer, list[str]]:
    d = IncrementalDetokenizer(tok, skip_special_tokens=skip)
    if windowed:
        d._backend, d._stream = None, None
    chunks = [ids[i:i + step] for i in range(0, len(ids), step)]
    return d, [d.add(c, final=i == len(chunks) - 1) for i, c in enumerate(chunks)]


def test_the_default_tokenizer_takes_the_decode_stream_path(tokenizer):
    assert IncrementalDetokenizer(tokenizer)._stream is not None
    assert IncrementalDetokenizer(None)._stream is None


@pytest.mark.parametrize("windowed", [False, True])
@pytest.mark.parametrize("skip", [True, False])
@pytest.mark.parametrize("step", [1, 3])
def test_deltas_are_whole_characters_and_add_up_to_the_full_decode(tokenizer, windowed, skip, step):
    for text in TEXTS:
        ids = tokenizer.encode(text, add_special_tokens=False)
        d, deltas = stream(tokenizer, ids, skip, windowed, step)
        assert "".join(deltas) == d.text == tokenizer.decode(ids, skip_special_tokens=skip)
        assert not any("\ufffd" in delta for delta in deltas)


@pytest.mark.parametrize("windowed", [False, True])
def test_random_ids_match_the_full_decode(tokenizer, windowed):
    rng = random.Random(0)
    for _ in range(4):
        ids = [rng.randrange(len(tokenizer)) for _ in range(120)]
        d, deltas = stream(tokenizer, ids, True, windowed)
        assert d.text == tokenizer.decode(ids, skip_special_tokens=True)


@pytest.mark.parametrize("windowed", [False, True])
def test_a_character_cut_short_at_the_end_is_flushed(tokenizer, windowed):
    """A request stopped (max_new_tokens) between the bytes of one character: the held-back bytes come
    out at the end as the full decode shows them (DecodeStream alone would drop them)."""
    ids = tokenizer.encode("ok 漢", add_special_tokens=False)[:-1]
    full = tokenizer.decode(ids)
    assert full.endswith("\ufffd")
    d, deltas = stream(tokenizer, ids, True, windowed)
    assert not any("\ufffd" in delta for delta in deltas[:-1])
    assert "".join(deltas) == d.text == full


def test_stop_helpers():
    assert stop_holdback("the answer is</", ("</s>",)) == 2
    assert stop_holdback("nothing", ("</s>",)) == 0
    assert trim_at_stop("abc</s>tail", "</s>") == "abc"
