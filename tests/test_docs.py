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


def test_ci_runs_the_readme_test_command_verbatim():
    root = DOCS.parent
    readme = (root / "README.md").read_text(encoding="utf-8")
    setup = readme.split("## Set up", 1)[1].split("\n## ", 1)[0]
    commands = [block.split("\n", 1)[1].strip() for block in setup.split("```bash")[1:]]
    commands = [c.split("```", 1)[0].strip() for c in commands]
    assert len(commands) == 2, commands  # exactly two set-up commands: serve, and test
    ci = (root / ".ci" / "run").read_text(encoding="utf-8").strip().splitlines()
    assert ci[-1] == commands[1]
    assert any(line.startswith("apt-get") and "chromium" in line for line in ci[:-1])
