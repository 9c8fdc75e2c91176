"""Evaluation data for DSL programs: read a JSON-lines file, fetch one by URL into a local cache.

SGLang's benchmark programs use `sglang.utils.read_jsonl` / `download_and_cache_file`; these are the
same calls (`from radixlm.lang.data_files import read_jsonl, download_and_cache_file`).
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def read_jsonl(filename: str | os.PathLike[str]) -> Iterator[Any]:
    """One decoded JSON value per line; blank lines and `#` comment lines are skipped."""
    with open(filename, encoding="utf-8") as fin:
        for lineno, line in enumerate(fin, 1):
            if not line.strip() or line.startswith("#"):
                continue
            try:
                yield json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{filename}:{lineno}: not a JSON value: {exc.msg}") from None


def default_cache_dir() -> Path:
    return Path(os.environ.get("RADIXLM_DATA_CACHE", Path.home() / ".cache" / "radixlm" / "data"))


def download_and_cache_file(url: str, filename: str | os.PathLike[str] | None = None, timeout: float = 60.0) -> str:
    """The local path of `url`'s content, downloaded once. Written to a temporary file and renamed,
    so an interrupted download never leaves a truncated file that later runs would trust."""
    target = Path(filename) if filename is not None else default_cache_dir() / url.rstrip("/").split("/")[-1]
    if target.exists():
        return str(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=target.name + ".", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=timeout) as resp:
            shutil.copyfileobj(resp, out)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return str(target)
