"""The scheduler's side of constrained decoding: compile off the loop, mask, advance, jump forward."""
from __future__ import annotations

import logging
from typing import Any

import torch

from radixlm.runtime.device_transfer import to_device
from radixlm.runtime.request import Req
from radixlm.runtime.server_args import ServerArgs

logger = logging.getLogger(__name__)


class GrammarRuntime:
    def __init__(self, args: ServerArgs, tokenizer: Any, tokenizer_path: str, vocab_size: int) -> None:
        from radixlm.constrained.service import GrammarService

        if tokenizer is None:
            raise ValueError("constrained decoding needs a tokenizer (not available with --skip-tokenizer-init)")
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        logger.info("first constrained request: preparing the %s grammar backend's view of the tokenizer",
                    args.grammar_backend)
        self.service = GrammarService(tokenizer_path, tokenizer=tokenizer, backend=args.grammar_backend,
                                      timeout_s=args.grammar_compile_timeout)
        self.pending: dict[int, Req] = {}

    def submit(self, req: Req) -> None:
        constraint = req.params.constraint
        assert constraint is not None
        kind, spec = constraint
        req.grammar_pending = True
        self.pending[id(req)] = req
        self.service.submit(id(req), {kind: spec})

    def poll(self) -> list[tuple[Req, Exception | None]]:
        """Requests whose grammar finished compiling since the last step (with the error, if any)."""
        done = []
        for key, result in self.service.poll():
            req = self.pending.pop(key, None)
            if req is None:
                continue
            req.grammar_pending = False
            if isinstance(result, Exception):
                done.append((req, result))
                continue
            req.grammar = result.matcher()
            for follower in req.followers:
                follower.grammar = result.matcher()
            done.append((req, None))
        return done

    def forget(self, req: Req) -> None:
        self.pending.pop(id(req), None)

    def bitmask(self, reqs: list[Req], device: torch.device) -> torch.Tensor:
        """[B, W] int32 on `device`: each constrained row filled by its matcher, others all-allowed.
        Filled on the host while the step's forward pass runs on the device."""
        from radixlm.constrained import allocate_token_bitmask, fill_next_token_bitmasks

        mask = allocate_token_bitmask(len(reqs), self.vocab_size)
        # A request finished meanwhile (overlap) keeps an all-allowed row: its token is dropped.
        fill_next_token_bitmasks([(r.grammar, i) for i, r in enumerate(reqs) if r.grammar is not None and not r.finished], mask)
        return to_device(mask, device)

    def advance(self, req: Req, token: int) -> None:
        if not req.grammar.advance(token):
            # The mask forbids this, so it means a bug (or an EOS the grammar refuses): stop cleanly.
            logger.error("grammar rejected sampled token %d for request %s", token, req.rid)
            req.grammar_failed = True

    def is_terminated(self, req: Req) -> bool:
        return bool(getattr(req, "grammar_failed", False)) or req.grammar.is_terminated()

    def jump_forward(self, req: Req, allow_retokenize: bool, min_tokens: int = 1) -> int:
        """Append the text the grammar forces (e.g. `", "name": "` in a JSON object) without a model
        step per token. The boundary is re-tokenized with the last output token when that token was
        not sent to the client yet, so the model sees natural tokens. Returns tokens added (net)."""
        forced = req.grammar.forced_prefix()
        if not forced or len(forced.encode()) < min_tokens:  # a token holds at least one byte
            return 0
        room = req.params.max_new_tokens - len(req.output_ids) - 1
        if room <= 0:
            return 0
        k = 1 if allow_retokenize and req.output_ids and len(req.output_ids) > req.sent_output_len else 0
        tail = self.tokenizer.decode(req.output_ids[-k:]) if k else ""
        new_ids = self.tokenizer.encode(tail + forced, add_special_tokens=False)
        if k and (not new_ids or self.tokenizer.decode(new_ids) != tail + forced):
            return 0
        if len(new_ids) - k < min_tokens or len(new_ids) - k > room:
            return 0
        grammar = req.grammar
        if k:
            grammar.rollback(k)
        accepted = 0
        for tid in new_ids:
            if not grammar.advance(tid):
                break
            accepted += 1
        if accepted < len(new_ids):  # not a valid path: restore the previous state exactly
            grammar.rollback(accepted)
            for tid in req.output_ids[len(req.output_ids) - k :]:
                grammar.advance(tid)
            return 0
        if k:
            del req.output_ids[-k:]
        req.output_ids.extend(new_ids)
        added = len(new_ids) - k
        req.forced_tokens += added
        return added

    def close(self) -> None:
        self.service.close()
