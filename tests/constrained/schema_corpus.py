"""The schema corpus: (name, schema, valid documents, invalid documents), 100+ entries.

Every document's classification is itself checked against the `jsonschema` validator
(test_corpus.py), so the corpus cannot drift from JSON-Schema semantics.
"""

from __future__ import annotations

from typing import Any

from . import corpus_api, corpus_nested, corpus_tools

Entry = tuple[str, Any, list[Any], list[Any]]

CORPUS: list[Entry] = [*corpus_api.ENTRIES, *corpus_tools.TOOLS, *corpus_tools.CONFIGS, *corpus_nested.ENTRIES]
BY_NAME: dict[str, Entry] = {e[0]: e for e in CORPUS}
assert len(BY_NAME) == len(CORPUS), "duplicate corpus names"
