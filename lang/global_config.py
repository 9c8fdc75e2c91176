"""Process-wide frontend settings (SGLang's `global_config`): the one place module-level state is right."""
from __future__ import annotations

from typing import Any


class GlobalConfig:
    """Mutable knobs read at call time, so a program can flip them between runs."""

    def __init__(self) -> None:
        # 0: silent, 1: warnings, 2: print each program's final text after run().
        self.verbosity: int = 0
        self.default_backend: Any = None
        # Sent with every gen as skip_special_tokens / spaces_between_special_tokens.
        self.skip_special_tokens_in_output: bool = True
        self.spaces_between_special_tokens_in_out: bool = True
        # run_batch pre-fills the traced constant prefix of a program once before the batch.
        self.enable_precache_with_tracing: bool = True
        # join(mode="concate_and_append") may splice KV caches on backends that can; none of ours can.
        self.enable_parallel_encoding: bool = True
        # Prefixes shorter than this are not worth a pre-cache round trip (SGLang: 64 characters).
        self.precache_min_chars: int = 64


global_config = GlobalConfig()
