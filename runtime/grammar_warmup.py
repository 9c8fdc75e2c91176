"""The grammar side's per-tokenizer costs, paid while the scheduler process starts, not beside its loop.

The first constrained request of a server used to build them during the loop's turns: on the
grammar-build thread, llguidance's token trie (`LLTokenizer`: 0.6-1.7 s on the 2-core VM by load, in
native code that holds the GIL: the loop's steps beside it took ~0.4 s rather than 20 ms), and on
the loop itself the tokenizer's byte view (`TokenizerInfo`: 0.12-0.27 s of Python). Both are cached
per tokenizer (`TokenizerInfo.from_tokenizer` per object, the trie per fingerprint), so building
them once here, on a thread beside the model's load, leaves a first constrained request only its
own grammar's work. A failure here is logged and left to that request, which meets it again.
"""
from __future__ import annotations

import logging
import threading
import time
from typing import Any

from radixlm.runtime.server_args import ServerArgs

logger = logging.getLogger(__name__)


def prepare(args: ServerArgs, tokenizer: Any) -> None:
    """Build what every grammar of this tokenizer shares: the byte view and the backend's own
    (a backend module's `prepare_tokenizer(info)`, where it has one)."""
    from radixlm.constrained.compiler import backend_module, default_backend
    from radixlm.constrained.vocab import TokenizerInfo

    started = time.monotonic()
    info = TokenizerInfo.from_tokenizer(tokenizer)
    backend = args.grammar_backend or default_backend()
    hook = getattr(backend_module(backend), "prepare_tokenizer", None)
    if hook is not None:
        hook(info)
    logger.info("grammar side ready for the tokenizer in %.1f s (%s)", time.monotonic() - started, backend)


def start(args: ServerArgs, tokenizer: Any) -> threading.Thread | None:
    """`prepare` on a background thread (None without a tokenizer: no constrained decoding then);
    the caller joins it before it takes requests."""
    if tokenizer is None:
        return None

    def run() -> None:
        try:
            prepare(args, tokenizer)
        except Exception:  # noqa: BLE001 - the first constrained request meets (and reports) it
            logger.warning("preparing the grammar side at start-up failed", exc_info=True)

    thread = threading.Thread(target=run, daemon=True, name="grammar-warmup")
    thread.start()
    return thread
