"""Every subpackage ships in the wheel: pyproject lists packages by hand (the repository root is the
package), and a new folder missing from that list installs fine in editable mode but is absent from a
built wheel. Two were missed before (quantization, lora)."""
from __future__ import annotations

import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_every_subpackage_is_listed_in_pyproject() -> None:
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {"radixlm"}
    for init in ROOT.rglob("__init__.py"):
        rel = init.parent.relative_to(ROOT)
        if rel.parts and rel.parts[0] in {"tests", "benchmarks", "docs", "build"} or any(p.startswith(".") for p in rel.parts):
            continue
        if rel.parts:
            found.add("radixlm." + ".".join(rel.parts))
    assert found - listed == set(), f"subpackages missing from [tool.setuptools] packages: {sorted(found - listed)}"
    assert listed - found == set(), f"listed packages that do not exist: {sorted(listed - found)}"
