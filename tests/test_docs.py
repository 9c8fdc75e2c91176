"""The committed server flag reference is what docs/gen_flags.py writes from the flag definitions."""
from __future__ import annotations

import importlib.util
from pathlib import Path

DOCS = Path(__file__).resolve().parent.parent / "docs"


def _gen_flags():
    spec = importlib.util.spec_from_file_location("gen_flags", DOCS / "gen_flags.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_server_flags_reference_is_up_to_date():
    gen = _gen_flags()
    text = gen.render()
    assert (DOCS / "server-flags.md").read_text(encoding="utf-8") == text, \
        "docs/server-flags.md is stale; run: python docs/gen_flags.py"
    # Every flag of the parser is documented (a flag added later shows up here).
    for action in gen.serve_parser()._actions:
        for flag in action.option_strings:
            if flag not in ("-h", "--help"):
                assert f"`{flag}`" in text, flag
