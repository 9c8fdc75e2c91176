"""Run from the repository root, `import radixlm` keeps the package's subpackages from shadowing PyPI
packages of the same top-level name (transformers >= 5.25 imports Hugging Face's `kernels`)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import radixlm

ROOT = Path(radixlm.__file__).resolve().parent


def test_top_level_kernels_is_not_the_package_folder(tmp_path: Path) -> None:
    # a stand-in for an installed `kernels` distribution elsewhere on sys.path
    (tmp_path / "kernels").mkdir()
    (tmp_path / "kernels" / "__init__.py").write_text("WHO = 'site-packages'\n")
    code = (f"import sys; sys.path[:0] = [{str(ROOT)!r}, {str(tmp_path)!r}]; "
            "import radixlm, kernels; print(kernels.WHO)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "site-packages"
    # radixlm's own subpackage stays where it belongs
    code = "import radixlm.kernels as k; print(k.__file__)"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and Path(out.stdout.strip()).parent == ROOT / "kernels", out.stderr
