"""Prometheus metrics (GET /metrics, only with --enable-metrics).

Names follow SGLang's (`sglang:` prefix) so existing dashboards work. Latencies are measured in this
(HTTP) process from the moment a request is accepted; gauges are read from the scheduler on scrape.
"""
from __future__ import annotations

import time
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from radixlm.runtime.sequence_output import SequenceDelta

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0)
_ITL_BUCKETS = (0.002, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5, 5.0)


class ServerMetrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self, model_name: str) -> None:
        self.registry = CollectorRegistry()
        self.labels = {"model_name": model_name}
        names = list(self.labels)
        r = self.registry

        def counter(name: str, doc: str) -> Any:
            return Counter(name, doc, names, registry=r).labels(**self.labels)

        def gauge(name: str, doc: str) -> Any:
            return Gauge(name, doc, names, registry=r).labels(**self.labels)

        def hist(name: str, doc: str, buckets: tuple[float, ...]) -> Any:
            return Histogram(name, doc, names, buckets=buckets, registry=r).labels(**self.labels)

        self.num_requests = counter("sglang:num_requests", "Finished generation requests (per sequence).")
        self.num_aborted = counter("sglang:num_aborted_requests", "Sequences that ended aborted.")
        self.prompt_tokens = counter("sglang:prompt_tokens", "Prompt tokens of finished sequences.")
        self.generation_tokens = counter("sglang:generation_tokens", "Generated tokens of finished sequences.")
        self.cached_tokens = counter("sglang:cached_tokens", "Prompt tokens served from the prefix cache.")
        self.http_errors = counter("sglang:http_errors", "HTTP responses with a 4xx/5xx status.")
        self.rejected = counter("sglang:num_rejected_requests", "Requests refused with 503 (too many in flight).")
        self.ttft = hist("sglang:time_to_first_token_seconds", "Time to first token.", _LATENCY_BUCKETS)
        self.itl = hist("sglang:inter_token_latency_seconds", "Time between streamed tokens.", _ITL_BUCKETS)
        self.e2e = hist("sglang:e2e_request_latency_seconds", "End-to-end request latency.", _LATENCY_BUCKETS)
        self.tpot = hist("sglang:time_per_output_token_seconds", "Per sequence: (E2E - TTFT) / (tokens - 1).",
                         _ITL_BUCKETS)
        self.running = gauge("sglang:num_running_reqs", "Requests running in the scheduler.")
        self.queued = gauge("sglang:num_queue_reqs", "Requests waiting in the scheduler.")
        self.inflight = gauge("sglang:num_inflight_sequences", "Sequences accepted by the HTTP server, not finished.")
        self.token_usage = gauge("sglang:token_usage", "KV pool fraction held by requests (cache excluded).")
        self.num_used_tokens = gauge("sglang:num_used_tokens", "KV slots held by requests (cache excluded).")
        self.retractions = gauge("sglang:num_retracted_reqs", "Requests retracted (KV full) since start.")
        self.kv_used = gauge("sglang:kv_used_tokens", "KV slots in use, cache included.")
        self.kv_cached = gauge("sglang:kv_cached_tokens", "KV slots held by the prefix cache.")
        self.kv_total = gauge("sglang:max_total_num_tokens", "KV pool size in tokens.")
        self.cache_hit_rate = gauge("sglang:cache_hit_rate", "Prefix-cache hit rate (cached / prompt tokens).")
        self.gen_throughput = gauge("sglang:gen_throughput", "Recent generation throughput (tokens/s).")
        self.spec_accept_length = gauge("sglang:spec_accept_length", "Speculative decoding: mean tokens emitted "
                                        "per verify step since start, the bonus token included.")
        self.spec_verify = counter("sglang:spec_verify_steps", "Speculative verify steps of finished sequences.")
        self.spec_accepted = counter("sglang:spec_accepted_tokens", "Draft tokens accepted in finished sequences.")

    def update_from_scheduler(self, info: dict[str, Any], inflight: int) -> None:
        total = max(int(info.get("max_total_num_tokens", 0)), 1)
        used = int(info.get("kv_used_tokens", 0))
        evictable = int(info.get("kv_evictable_tokens", 0))
        self.running.set(info.get("num_running_reqs", 0))
        self.queued.set(info.get("num_waiting_reqs", 0))
        self.inflight.set(inflight)
        self.token_usage.set(max(used - evictable, 0) / total)
        self.num_used_tokens.set(max(used - evictable, 0))
        self.retractions.set(info.get("retractions", 0))
        self.kv_used.set(used)
        self.kv_cached.set(info.get("kv_cached_tokens", 0))
        self.kv_total.set(total)
        self.cache_hit_rate.set(info.get("cache_hit_rate", 0.0))
        self.gen_throughput.set(info.get("last_gen_throughput", 0.0))
        self.spec_accept_length.set(info.get("avg_spec_accept_length") or 0.0)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class SequenceTimer:
    """Per-sequence timing: TTFT at the first streamed token, ITL per later token, E2E at the end."""

    __slots__ = ("metrics", "start", "last", "tokens", "done", "first")

    def __init__(self, metrics: ServerMetrics | None, start: float) -> None:
        self.metrics = metrics
        self.start = start
        self.last: float | None = None
        self.tokens = 0
        self.done = False
        self.first: float | None = None  # when the first token arrived

    def update(self, d: SequenceDelta) -> None:
        m = self.metrics
        if m is None or self.done:
            return
        now = time.monotonic()
        n = d.completion_tokens
        if n > self.tokens:
            if self.last is None:
                self.first = now
                m.ttft.observe(now - self.start)
            else:
                k = n - self.tokens  # a chunk of k tokens counts as k gaps of equal share
                for _ in range(k):
                    m.itl.observe((now - self.last) / k)
            self.tokens, self.last = n, now
        reason = d.finish
        if reason is not None:
            self.done = True
            m.e2e.observe(now - self.start)
            if n > 1 and self.first is not None:
                m.tpot.observe((now - self.first) / (n - 1))
            m.num_requests.inc()
            m.prompt_tokens.inc(d.prompt_tokens)
            m.generation_tokens.inc(n)
            m.cached_tokens.inc(d.cached_tokens)
            m.spec_verify.inc(d.spec_verify_ct or 0)
            m.spec_accepted.inc(d.spec_accepted_tokens or 0)
            if reason.kind == "abort":
                m.num_aborted.inc()

    def cancel(self) -> None:
        """The sequence ended without a final output (client gone, server error): count it as aborted."""
        if self.metrics is not None and not self.done:
            self.done = True
            self.metrics.num_aborted.inc()
