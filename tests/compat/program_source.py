"""SGLang's own frontend test programs (sglang/test/test_programs.py from the installed wheel), loaded
for one of two frontends: SGLang's real `sglang` package, or `import radixlm as sgl`.

The module cannot be imported as shipped: its header imports `sglang.srt.utils`, SGLang's server
package, which needs PIL, CUDA helpers and the rest of SGLang's dependencies (the wheel is installed
without them). So its source is loaded with the import lines below swapped; every swap must match,
so a new SGLang version that changes them fails here instead of silently running something else.
The program bodies themselves are executed unchanged, except that CI (`trimmed=True`) shortens the
generation lengths listed in CI_TRIMS, which no assertion of the program depends on;
`RADIXLM_COMPAT_ALL=1` (benchmarks/compat.py) runs them as shipped.
"""
from __future__ import annotations

import importlib.util
import types
from pathlib import Path

FRONTENDS = ("sglang", "radixlm")

# SGLang's server utilities -> what this harness binds instead, for both frontends: radixlm has no
# is_hip (a DSL user asks torch), and its get_tokenizer is radixlm.get_tokenizer.
_COMMON_SWAPS = {
    "from sglang.srt.utils import is_hip":
        "from tests.compat.program_source import is_hip",
}
_SWAPS = {
    "sglang": {
        **_COMMON_SWAPS,
        "from sglang.srt.utils.hf_transformers_utils import get_tokenizer":
            "from transformers import AutoTokenizer; get_tokenizer = AutoTokenizer.from_pretrained",
    },
    "radixlm": {
        **_COMMON_SWAPS,
        "import sglang as sgl": "import radixlm as sgl",
        "from sglang.utils import download_and_cache_file, read_jsonl":
            "from radixlm.lang.data_files import download_and_cache_file, read_jsonl",
        "from sglang.lang.ir import REGEX_FLOAT, REGEX_INT, REGEX_STR":
            "from radixlm.lang.ir import REGEX_FLOAT, REGEX_INT, REGEX_STR",
        "from sglang.srt.utils.hf_transformers_utils import get_tokenizer":
            "from radixlm import get_tokenizer",
    },
}

# CI only: test_parallel_decoding's last step decodes a 512-token summary after the fork/join it exists
# to check (its only check on the summary: a string), ~25 s per frontend on a 2-core CPU at float32.
# 32 tokens still decode a summary of the joined branches through each frontend. Its five forks decode
# up to 64 tokens each (stop "\n\n"; read back only into the summary's prompt): 16 still fork, decode
# the five branches as one batch and join them (~5 CPU-s less per frontend).
CI_TRIMS = {
    'sgl.gen("summary", max_tokens=512)': 'sgl.gen("summary", max_tokens=32)',
    "max_tokens = 64\n    fork_size = 5": "max_tokens = 16\n    fork_size = 5",
}


def is_hip() -> bool:
    import torch

    return torch.version.hip is not None


def source_path() -> Path:
    spec = importlib.util.find_spec("sglang")
    if spec is None or spec.origin is None:
        raise ImportError("sglang is not installed (the test extra installs sglang==0.5.10 without dependencies)")
    return Path(spec.origin).parent / "test" / "test_programs.py"


def load_programs(frontend: str, trimmed: bool = False) -> types.ModuleType:
    """The test_programs module with its imports bound to `frontend` (and CI_TRIMS applied if `trimmed`)."""
    if frontend not in FRONTENDS:
        raise ValueError(f"frontend must be one of {FRONTENDS}, got {frontend!r}")
    path = source_path()
    source = path.read_text()
    for old, new in {**_SWAPS[frontend], **(CI_TRIMS if trimmed else {})}.items():
        if old not in source:
            raise AssertionError(f"{path}: expected the text {old!r}; SGLang's test module changed")
        source = source.replace(old, new)
    module = types.ModuleType(f"sglang_test_programs_{frontend}")
    module.__file__ = str(path)
    exec(compile(source, str(path), "exec"), module.__dict__)
    return module


def frontend_module(frontend: str) -> types.ModuleType:
    if frontend == "sglang":
        import sglang

        return sglang
    import radixlm

    return radixlm
