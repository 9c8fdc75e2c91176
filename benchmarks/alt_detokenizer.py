"""Issue 16.7 (2): tokenizers' DecodeStream vs our IncrementalDetokenizer (runtime/detokenizer.py).

Three decoders: `windowed` (ours before: re-decode a sliding window of ids in Python each token),
`decode_stream` (tokenizers' DecodeStream as it is) and `ours` (runtime/detokenizer.py now:
DecodeStream plus a flush of bytes still pending at the end). All are fed the same token ids one
at a time (as the scheduler's outputs arrive) with the default model's tokenizer. Checked per sequence and mode (skip_special_tokens on/off):
  * identical text: the concatenated deltas (ours: with `final=True` on the last token) equal
    `tokenizer.decode(all ids)`;
  * no partial characters: no delta holds U+FFFD where the full decode has none (a character split
    across tokens was emitted half-way);
  * speed: microseconds per token, each sequence decoded in full, best of `--repeat`.

    python benchmarks/alt_detokenizer.py [--tokenizer DIR] [--out FILE.json]
"""
from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from pathlib import Path
from typing import Any

TEXTS = {
    "english": "The quick brown fox jumps over the lazy dog. " * 12,
    "code": "def f(x):\n    return {'a': [1, 2, 3], \"b\": x ** 2}  # comment\n\n\tif x:\n\t\tpass\n" * 6,
    "chinese": "北京是中华人民共和国的首都，也是全国的政治、文化中心。我们明天去长城吧！" * 6,
    "japanese_korean": "東京タワーは高さ333メートルです。서울은 대한민국의 수도입니다. " * 6,
    "emoji_zwj": "Family: 👨‍👩‍👧‍👦, flags 🇫🇷🇯🇵, skin 👍🏽, keycap 1️⃣ and 🙂🙃 " * 6,
    "combining": "Cafe\u0301 nai\u0308ve Zoe\u0308 a\u0300 la carte — “quotes” … ¿qué? ß Ω ≈ ∑ " * 6,
    "arabic_hindi": "مرحبا بالعالم. नमस्ते दुनिया। שלום עולם " * 6,
    "whitespace": "a  b   c\n\n\n   d\t\t e \r\n" * 10,
    "chat_special": "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\nHello! 🙂<|im_end|>\n" * 4,
}


def load(tokenizer_dir: str | None) -> Any:
    from transformers import AutoTokenizer

    from radixlm.runtime.model_source import resolve_model_path

    return AutoTokenizer.from_pretrained(tokenizer_dir or str(resolve_model_path(None)))


def sequences(tok: Any, n_random: int, seed: int) -> dict[str, list[int]]:
    out = {name: tok.encode(text, add_special_tokens=False) for name, text in TEXTS.items()}
    rng = random.Random(seed)
    vocab = len(tok)
    for i in range(n_random):  # what a sampler at high temperature can emit: any id, any order
        out[f"random_ids_{i}"] = [rng.randrange(vocab) for _ in range(256)]
    # Byte tokens of a multi-byte character cut short at the end (a max_new_tokens stop mid-character).
    cut = tok.encode("done: 漢", add_special_tokens=False)
    out["cut_mid_character"] = cut[:-1] if len(cut) > 1 else cut
    return out


def run_ours(tok: Any, ids: list[int], skip: bool, windowed: bool = False) -> list[str]:
    from radixlm.runtime.detokenizer import IncrementalDetokenizer

    d = IncrementalDetokenizer(tok, skip_special_tokens=skip)
    if windowed:  # the path slow tokenizers take: what every tokenizer took before DecodeStream
        d._backend, d._stream = None, None
    return [d.add([t], final=i == len(ids) - 1) for i, t in enumerate(ids)]


def run_windowed(tok: Any, ids: list[int], skip: bool) -> list[str]:
    return run_ours(tok, ids, skip, windowed=True)


def run_stream(tok: Any, ids: list[int], skip: bool) -> list[str]:
    from tokenizers.decoders import DecodeStream

    backend = tok.backend_tokenizer
    stream = DecodeStream(skip_special_tokens=skip)
    return [stream.step(backend, t) or "" for t in ids]


IMPLEMENTATIONS = {"windowed": run_windowed, "decode_stream": run_stream, "ours": run_ours}


def check(tok: Any, ids: list[int], skip: bool, deltas: list[str]) -> dict[str, Any]:
    reference = tok.decode(ids, skip_special_tokens=skip)
    text = "".join(deltas)
    partial = sum(1 for d in deltas if "\ufffd" in d) if "\ufffd" not in reference else 0
    return {"identical": text == reference, "partial_deltas": partial,
            "missing_chars": max(len(reference) - len(text), 0) if text != reference else 0}


def timed(fn: Any, tok: Any, ids: list[int], skip: bool, repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn(tok, ids, skip)
        best = min(best, time.perf_counter() - t0)
    return best / max(len(ids), 1) * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokenizer", default=None, help="tokenizer folder (default: the default model's)")
    ap.add_argument("--random", type=int, default=8, help="sequences of random token ids")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    tok = load(args.tokenizer)
    rows = []
    for name, ids in sequences(tok, args.random, args.seed).items():
        for skip in (True, False):
            row: dict[str, Any] = {"sequence": name, "tokens": len(ids), "skip_special_tokens": skip}
            for label, fn in IMPLEMENTATIONS.items():
                row[label] = {**check(tok, ids, skip, fn(tok, ids, skip)),
                              "us_per_token": round(timed(fn, tok, ids, skip, args.repeat), 2)}
            rows.append(row)
    summary = {}
    for label in IMPLEMENTATIONS:
        summary[label] = {
            "identical": sum(r[label]["identical"] for r in rows), "cases": len(rows),
            "partial_deltas": sum(r[label]["partial_deltas"] for r in rows),
            "median_us_per_token": round(statistics.median(r[label]["us_per_token"] for r in rows), 2),
            "not_identical": [f"{r['sequence']} (skip={r['skip_special_tokens']}, missing {r[label]['missing_chars']})"
                              for r in rows if not r[label]["identical"]],
        }
    print(json.dumps(summary, indent=1, ensure_ascii=False))
    if args.out:
        args.out.write_text(json.dumps({"summary": summary, "rows": rows}, indent=1, ensure_ascii=False))


if __name__ == "__main__":
    main()
