"""`--log-requests`: one log line per finished sequence, written by the front process.

Level 0 logs numbers only (rid, tokens, cached tokens, latency, finish reason); 1 adds the sampling
parameters; 2 adds the prompt and output text. Text is never logged below level 2: prompts are
often private.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import time
from typing import Any

logger = logging.getLogger("radixlm.requests")
_TEXT_LIMIT = 2000  # characters of prompt / output per line at level 2


class RequestLog:
    def __init__(self, level: int) -> None:
        self.level = level

    def finished(self, state: Any) -> None:
        """`state`: the front's ReqState of a sequence that just finished."""
        out = state.last
        reason = out.finished_reason if out is not None else None
        fields: dict[str, Any] = {
            "rid": state.rid,
            "prompt_tokens": len(state.prompt_ids),
            "completion_tokens": len(state.output_ids),
            "cached_tokens": out.cached_tokens if out is not None else 0,
            "latency_s": round(time.monotonic() - state.created, 4),
            "finish_reason": reason.kind if reason is not None else None,
        }
        if self.level >= 1:
            fields["sampling_params"] = {k: v for k, v in dataclasses.asdict(state.item.params).items()
                                         if v is not None and k != "constraint"}
        if self.level >= 2:
            fields["prompt"] = (state.item.text or "")[:_TEXT_LIMIT]
            fields["output"] = state.detok.text[:_TEXT_LIMIT]
        logger.info("Finish request: %s", json.dumps(fields, default=str, ensure_ascii=False))
