"""The scheduler's periodic status line (SGLang's "Decode batch." line), every N decode steps:

    Decode batch. #running-req: 12, #queue-req: 0, #token: 5120, token usage: 0.08, cache hit rate: 41.2%,
    gen throughput (token/s): 812.40

Throughput is measured over the steps since the previous line; the rest is read from the
scheduler's info() only when a line is due, so the per-step cost is one counter increment.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from radixlm.runtime.forward_batch import ForwardMode

logger = logging.getLogger("radixlm.scheduler")


class DecodeLog:
    def __init__(self, interval: int) -> None:
        self.interval = interval  # 0: never
        self.decode_steps = 0
        self._last: tuple[float, int] | None = None  # (time, generated tokens) at the previous line

    def on_step(self, mode: ForwardMode, info: Callable[[], dict[str, Any]]) -> None:
        if not self.interval or mode != ForwardMode.DECODE:
            return
        self.decode_steps += 1
        if self._last is None:  # the first decode step: the baseline of the first line's throughput
            self._last = (time.monotonic(), int(info().get("generated_tokens", 0)))
        elif self.decode_steps % self.interval == 0 and logger.isEnabledFor(logging.INFO):
            logger.info("%s", self.line(info(), time.monotonic()))

    def line(self, info: dict[str, Any], now: float) -> str:
        generated = int(info.get("generated_tokens", 0))
        throughput = 0.0
        if self._last is not None and now > self._last[0]:
            throughput = (generated - self._last[1]) / (now - self._last[0])
        self._last = (now, generated)
        total = max(int(info.get("max_total_num_tokens", 0)), 1)
        held = max(int(info.get("kv_used_tokens", 0)) - int(info.get("kv_evictable_tokens", 0)), 0)
        return (f"Decode batch. #running-req: {info.get('num_running_reqs', 0)}, "
                f"#queue-req: {info.get('num_waiting_reqs', 0)}, #token: {held}, token usage: {held / total:.2f}, "
                f"cache hit rate: {100 * float(info.get('cache_hit_rate', 0.0)):.1f}%, "
                f"gen throughput (token/s): {throughput:.2f}")
